#!/usr/bin/env python3
"""The class-masked InfoNCE of SPEC section 4 written in PyTorch, timed on the GPU, as the
reference point for the fused kernels (tests/gpu_bench.rs `infonce`).

Same batch shape as benches/infonce.rs and tests/gpu_bench.rs: a third of the rows are
forget tokens in two views (anchors, partners of each other), 13 classes with 'O' on ~80%
of rows, width 384, defaults tau 0.1, same-class denominator, own view negative,
detached columns. Forward + backward, fp32, the m x m similarity matrix materialised as
PyTorch does. Prints `BENCH` lines: time per forward+backward and peak memory, or OOM.

Usage: python3 scripts/infonce_torch.py [m ...]    (default 4096 16384 65536)
"""
import sys
import time

import torch


def batch(m, c, device):
    g = torch.Generator().manual_seed(0)
    nf = m // 6
    labels = torch.where(torch.rand(m, generator=g) < 0.2, 1 + torch.randint(0, 12, (m,), generator=g), 0)
    labels[nf : 2 * nf] = labels[:nf]
    anchor = torch.zeros(m, dtype=torch.bool)
    anchor[: 2 * nf] = True
    z = torch.nn.functional.normalize(torch.rand(m, c, generator=g) * 2 - 1, dim=1)
    return z.to(device), labels.to(device), anchor.to(device)


def infonce(z, labels, anchor, tau=0.1):
    """L_f of SPEC section 4 with its defaults: same-class denominator, own view kept as a
    negative, detached columns. z [m, c] unit rows (every row is a column), labels [m],
    anchor [m] bool. Only the anchor rows of the similarity matrix are formed ([A, m],
    not [m, m]): the other rows enter no term. Also imported by scripts/compare-torch.py."""
    cols = z.detach()  # detached columns (SPEC 4 point 6)
    rows = anchor.nonzero().squeeze(1)  # [A]
    s = z[rows] @ cols.T / tau  # [A, m]
    same = labels[rows, None] == labels[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(len(rows), device=z.device), rows] = True
    d = same & ~own  # same-class denominator, own view kept (negative)
    p = ~same
    lse = torch.logsumexp(s.masked_fill(~d, float("-inf")), dim=1)
    npos = p.sum(1)
    mean_p = (s * p).sum(1) / npos.clamp(min=1)
    valid = (npos > 0) & d.any(1)
    return (lse - mean_p)[valid].mean()


def main():
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return
    dev = torch.device("cuda")
    sizes = [int(a) for a in sys.argv[1:]] or [4096, 16384, 65536]
    c = 384
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    for m in sizes:
        try:
            z, labels, anchor = batch(m, c, dev)
            z.requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            infonce(z, labels, anchor).backward()  # warm-up
            torch.cuda.synchronize()
            reps = 10 if m <= 4096 else 3
            t0 = time.perf_counter()
            for _ in range(reps):
                z.grad = None
                infonce(z, labels, anchor).backward()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"BENCH torch_infonce_fwd_bwd_m{m}_c{c} {ms:.3f} ms (peak {peak:.0f} MiB above inputs)")
        except torch.cuda.OutOfMemoryError:
            print(f"BENCH torch_infonce_fwd_bwd_m{m}_c{c} OOM")
        finally:
            z = labels = anchor = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
