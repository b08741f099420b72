"""hetcomm.ddp_hook registered on DDP runs as the C++ hook and averages
gradients within the codec's bound, bit-identical on every rank."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_ranks import run_ranks  # noqa: E402


def _hooked_grads(rank: int, ws: int, codec: str) -> tuple[list, list, float]:
    import torch.distributed as dist

    import hetcomm
    from hetcomm.torch import hooks
    from hetcomm.torch.options import ProcessGroupOptions

    dist.init_process_group("hetcomm", pg_options=ProcessGroupOptions(site=f"dc{rank * 2 // ws}"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.5)

    def python_path_used(*args: object) -> None:
        raise AssertionError("the Python hook ran: DDP did not get the C++ hook")

    hooks._backend_of = python_path_used  # the C++ hook never calls back into Python
    ddp.register_comm_hook(None, hetcomm.ddp_hook(codec))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    # The exact average: each rank's own gradient, summed uncompressed.
    model.zero_grad()
    model(x).square().mean().backward()
    exact = [p.grad.clone() for p in model.parameters()]
    for g in exact:
        dist.all_reduce(g)
    bound = max(float(g.abs().max()) for g in exact) * 3 / 127 / ws  # three quantizations at most, int8 steps
    return [g.numpy().tobytes() for g in got], [(a - b / ws).abs().max().item() for a, b in zip(got, exact)], bound


@pytest.mark.timeout(240)
def test_ddp_hook_is_native_bounded_and_identical():
    results = run_ranks(_hooked_grads, 4, "int8", timeout=200)
    assert len({tuple(r[0]) for r in results}) == 1  # bit-identical gradients on every rank
    for _, errors, bound in results:
        assert max(errors) <= bound, (errors, bound)
        assert max(errors) > 0  # it did compress
