"""The direct launcher (`kernels/_launch.py`) reuses a compiled kernel only where Triton would.

Its signature key is checked against Triton's own binder (the function `kernel[grid](...)` runs to
specialise each argument), built for an sm_90 target, which needs no GPU: two argument values
with the same key must get the same Triton specialisation. On a GPU the direct path is also run
against Triton's own path on a small kernel with each kind of signature change.
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from empf_triton.kernels import _launch  # noqa: E402


def _add(p_x, p_out, n, alpha, scale_one, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    y = tl.load(p_x + o, mask=m) * alpha + scale_one
    if FLAG:
        y = y + 1.0
    tl.store(p_out + o, y, mask=m)


def _jit_kernel() -> JITFunction:
    # a JITFunction even under the interpreter (where @triton.jit makes an InterpretedFunction)
    return JITFunction(_add)


def _binder(jit: JITFunction):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return create_function_from_signature(jit.signature, jit.params, backend)


INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 1, 2**31, 2**31 + 16, -(2**31),
        -(2**31) - 1, -(2**31) - 16, 2**62, 2**63, 2**63 + 16]  # fmt: skip
FLOATS = [0.0, 1.0, 0.5, -3.25, float("inf")]


def _tensors():
    base = torch.zeros(64)
    out = [base[off:] for off in (0, 1, 2, 3, 4, 8)]
    out += [
        torch.zeros(64, dtype=dt)[off:] for dt in (torch.float16, torch.uint8) for off in (0, 1, 8)
    ]
    return out


def test_runtime_class_matches_tritons_specialisation():
    jit = _jit_kernel()
    binder = _binder(jit)
    x = torch.zeros(64)

    def spec_int(v):  # `n` is the third argument
        return binder(x, x, v, 0.5, 2.0, True, 128)[1][2]

    def spec_ptr(t):
        return binder(t, x, 3, 0.5, 2.0, True, 128)[1][0]

    def spec_float(v):
        return binder(x, x, 3, v, 2.0, True, 128)[1][3]

    for a, b in itertools.combinations(INTS, 2):
        same_key = _launch.runtime_class(a) == _launch.runtime_class(b)
        assert same_key == (spec_int(a) == spec_int(b)), (a, b, spec_int(a), spec_int(b))
    tensors = _tensors()
    for a, b in itertools.combinations(tensors, 2):
        same_key = _launch.runtime_class(a) == _launch.runtime_class(b)
        assert same_key == (spec_ptr(a) == spec_ptr(b)), (a.dtype, a.data_ptr() % 16, b.dtype)
    for a, b in itertools.combinations(FLOATS, 2):
        assert _launch.runtime_class(a) == _launch.runtime_class(b)
        assert spec_float(a) == spec_float(b)
    # an int where a float was meant is a different (constexpr) specialisation: keyed apart
    assert _launch.runtime_class(1) != _launch.runtime_class(1.0)
    assert spec_float(1) != spec_float(1.0)


def test_signature_keys_constexprs_and_the_autotune_key_by_value(monkeypatch):
    jit = _jit_kernel()
    tuner = triton.autotune([triton.Config({"BLOCK": 128})], key=["n"])(jit)
    launcher = _launch.Launcher(tuner)
    assert launcher.by_value == [False, False, True, False, False, True, True]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x, out = torch.zeros(64), torch.zeros(64)
    args = dict(p_x=x, p_out=out, n=64, alpha=0.5, scale_one=2.0, FLAG=True)
    base = launcher.signature(args)
    assert launcher.signature(dict(args, alpha=-1.5)) == base  # floats: one fp32 argument
    assert launcher.signature(dict(args, p_x=torch.zeros(64))) == base  # another aligned buffer
    for change in (dict(n=65), dict(FLAG=False), dict(p_x=x[1:]), dict(p_out=out.half())):
        assert launcher.signature(dict(args, **change)) != base, change


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_path_equals_tritons_path_on_each_signature(monkeypatch):
    jit = _jit_kernel()
    tuner = triton.autotune(
        [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n"]
    )(jit)
    launcher = _launch.Launcher(tuner)
    monkeypatch.setattr(_launch, "ENABLED", True)
    base = torch.randn(300, device="cuda")
    cases = [
        dict(p_x=base, n=300, alpha=0.5, scale_one=2.0, FLAG=True),
        dict(p_x=base, n=300, alpha=-1.5, scale_one=1.0, FLAG=True),  # float 1.0 stays runtime
        dict(p_x=base[1:], n=299, alpha=0.5, scale_one=2.0, FLAG=False),  # unaligned pointer
        dict(p_x=base, n=1, alpha=3.0, scale_one=0.0, FLAG=True),  # n == 1 is a constant
        dict(p_x=base[16:], n=16, alpha=0.25, scale_one=0.5, FLAG=False),
    ]
    for args in cases:
        for _ in range(3):  # first call through Triton, then the direct path (cache hit)
            out = torch.full_like(base, float("nan"))
            launcher(
                lambda meta, n=args["n"]: (triton.cdiv(n, meta["BLOCK"]),), dict(args, p_out=out)
            )
            n = args["n"]
            ref = (
                args["p_x"][:n] * args["alpha"] + args["scale_one"] + (1.0 if args["FLAG"] else 0.0)
            )
            torch.testing.assert_close(out[:n], ref, rtol=0, atol=1e-6)
            assert out[n:].isnan().all()
    assert len(launcher.cache) == len(cases) - 1  # cases 0 and 1 share a signature
