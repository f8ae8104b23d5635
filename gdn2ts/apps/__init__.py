"""Applications built on the library: the quickstart, the audit demo, the recall probes and their reports, the
baselines they compare against, and the ``gdn2ts stream`` command. Nothing in ``gdn2ts.streaming`` (or below)
imports from here."""
