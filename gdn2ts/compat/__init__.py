"""Drop-in modules with other libraries' signatures over gdn2ts's ops: ``fla`` (flash-linear-attention 0.6's
``fla.ops.gdn2``: ``chunk_gdn2``, ``fused_recurrent_gdn2``, ``fused_recurrent_gdn2_fwd``)."""
