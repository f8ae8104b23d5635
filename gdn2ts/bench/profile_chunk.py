"""Time each launch of the Triton chunked forward separately (GPU): ``python -m gdn2ts.bench.profile_chunk``."""

from __future__ import annotations

import torch
import triton
from triton.testing import do_bench

from gdn2ts.bench.kernels import H, K, V, make_inputs
from gdn2ts.kernels import chunk_fwd as cf


def profile(B: int, T: int) -> dict:
    q, k, v, g, b, w = make_inputs(B, T, seed=1)
    NT = triton.cdiv(T, cf.BT)
    G = torch.empty(B, T, H, K, device="cuda")
    Y = torch.empty(B, T, H, K, device="cuda")
    U = torch.empty(B, T, H, V, device="cuda")
    A = torch.empty(B, T, H, cf.BT, device="cuda")
    o = torch.empty_like(v)
    ht = torch.empty(B, H, K, V, device="cuda")
    times = {
        "cumsum": do_bench(lambda: cf._cumsum_kernel[(NT, B * H)](g, G, T, HG=H, K=K, BT=cf.BT, BK=K),
                           return_mode="median"),
        "intra": do_bench(lambda: cf._intra_kernel[(NT, B * H)](q, k, v, G, b, w, Y, U, A, K**-0.5, T, H=H, HV=H,
                                                                 HG=H, HB=H, K=K, V=V, BK=K, BV=V, BT=cf.BT,
                                                                 BC=cf.BC, PRECISION="tf32",
                                                                 SAFE_SPREAD=cf.SAFE_SPREAD, num_warps=4),
                          return_mode="median"),
        "state": do_bench(lambda: cf._state_kernel[(V // 32, B * H)](q, k, G, Y, U, A, o, o, ht, K**-0.5, T, H=H,
                                                                      HV=H, HG=H, K=K, V=V, BK=K, BV=32, BT=cf.BT,
                                                                      HAS_H0=False, STORE_HT=True,
                                                                      PRECISION="tf32", num_warps=4, num_stages=2),
                          return_mode="median"),
    }
    print(f"{T}x{B}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), flush=True)
    return times


if __name__ == "__main__":
    for B, T in ((8, 2048), (1, 16384)):
        profile(B, T)
