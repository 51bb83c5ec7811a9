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


def test_by_value_arguments_are_keyed_by_type_as_tritons_cache_key(monkeypatch):
    """True == 1 == 1.0 as dict keys, but Triton compiles a constexpr True, 1 and 1.0 (and an int
    16 and a float 16.0 given for a non-constexpr autotune key) as different kernels: where the
    launcher's signatures are equal, Triton's compile-cache key (`str` of the binder's
    specialisation) must be equal too."""
    jit = _jit_kernel()
    binder = _binder(jit)
    tuner = triton.autotune([triton.Config({"BLOCK": 128})], key=["n"])(jit)
    launcher = _launch.Launcher(tuner)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = torch.zeros(64)
    base = dict(p_x=x, p_out=x, n=64, alpha=0.5, scale_one=2.0, FLAG=True)
    for name, values in (
        ("FLAG", [True, 1, 1.0, False, 0, 0.0, None, 2]),
        ("n", [1, True, 1.0, 16, 16.0, 17, False, 0, 0.0]),
    ):
        for a, b in itertools.combinations(values, 2):
            args_a, args_b = dict(base, **{name: a}), dict(base, **{name: b})
            if launcher.signature(args_a) == launcher.signature(args_b):
                spec_a = binder(**args_a, BLOCK=128)[1]
                spec_b = binder(**args_b, BLOCK=128)[1]
                assert str(spec_a) == str(spec_b), (name, a, b, spec_a, spec_b)


def test_hooks_and_pre_run_hooks_take_tritons_path(monkeypatch):
    """A launch exit hook alone, or a jit pre-run hook, sends the call through `tuner.run` (the
    direct path would skip them), even for a signature already cached."""
    jit = _jit_kernel()
    launcher = _launch.Launcher(jit)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_STREAM", lambda device: 0)
    calls = []
    monkeypatch.setattr(jit, "run", lambda **kw: calls.append("triton"))

    class _Kernel:
        function = packed_metadata = None

        def run(self, *a):
            calls.append("direct")

    x = torch.zeros(64)
    args = dict(p_x=x, p_out=x, n=64, alpha=0.5, scale_one=2.0, FLAG=True, BLOCK=64)
    launcher.cache[launcher.signature(args)] = (_Kernel(), {})
    launcher((1,), args)
    assert calls == ["direct"]
    hook = lambda *a: None  # noqa: E731
    triton.knobs.runtime.launch_exit_hook.add(hook)
    try:
        launcher((1,), args)
    finally:
        triton.knobs.runtime.launch_exit_hook.remove(hook)
    assert calls == ["direct", "triton"]
    jit.add_pre_run_hook(lambda *a, **kw: None)
    launcher((1,), args)
    assert calls == ["direct", "triton", "triton"]


def _add_defaults(p_x, p_out, n, alpha, scale_one=1.0, FLAG: tl.constexpr = False,
                  BLOCK: tl.constexpr = 32):  # fmt: skip
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p_out + o, tl.load(p_x + o, mask=o < n) * alpha + scale_one, mask=o < n)


def test_direct_call_passes_tritons_bound_arguments_in_order(monkeypatch):
    """The launcher's positional arguments (after the 9 launch slots) are Triton's
    `bound_args.values()`: every parameter in order, constexprs, defaults and the autotuner's
    config included; the grid function sees the same values."""
    jit = JITFunction(_add_defaults)
    binder = _binder(jit)
    tuner = triton.autotune([triton.Config({"BLOCK": 128})], key=["n"])(jit)
    launcher = _launch.Launcher(tuner)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_STREAM", lambda device: 7)
    seen = []

    class _Kernel:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            seen.append(a)

    x, out = torch.zeros(64), torch.zeros(64)
    for args in (
        dict(p_x=x, p_out=out, n=64, alpha=0.5),
        dict(p_x=x, p_out=out, n=1, alpha=2.0, FLAG=True),
        dict(p_x=x, p_out=out, n=3, alpha=2.0, scale_one=0.5, FLAG=1),
    ):
        launcher.cache[launcher.signature(args)] = (_Kernel(), {"BLOCK": 128})
        metas = []
        launcher(lambda meta, metas=metas: metas.append(dict(meta)) or (5, 2), args)
        bound = binder(**args, BLOCK=128)[0]
        assert seen[-1][:9] == (5, 2, 1, 7, "fn", "meta", None, None, None)
        assert list(seen[-1][9:]) == list(bound.values())
        assert {k: metas[0][k] for k in bound} == bound


def test_generated_signature_equals_runtime_class_for_every_kind(monkeypatch):
    """The generated signature inlines runtime_class for floats, tensors and ints: same result."""
    launcher = _launch.Launcher(_jit_kernel())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = torch.zeros(64)
    param = torch.nn.Parameter(torch.zeros(8))
    values = INTS + FLOATS + _tensors() + [True, False, None, param, 1.0, 1]
    idx = launcher.names.index("n") + 1  # + 1: the device comes first
    for v in values:
        args = dict(p_x=x, p_out=x, n=v, alpha=0.5, scale_one=2.0, FLAG=True, BLOCK=128)
        assert launcher.signature(args)[idx] == _launch.runtime_class(v), v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_op_gives_the_same_bits_through_both_launch_paths():
    """Each op family, through Triton's own launch path and then twice through the direct one
    (the first direct call fills the cache, the second hits it): identical outputs and grads."""
    from empf_triton.ops.binary import binary_matmul, pack_weight
    from empf_triton.ops.binary_conv import binary_conv_neuron
    from empf_triton.ops.lif import lif_neuron
    from empf_triton.ops.neuron import empf_neuron, empf_neuron_step
    from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(3, 37, 5, device=dev)
    v = torch.randn(37, 5, device=dev)
    d = torch.rand(3, device=dev)
    w = torch.randn(9, 70, device=dev)
    a = torch.randn(5, 70, device=dev)
    packed = pack_weight(w, 1)
    cw = pack_weight(torch.randn(6, 4, 3, 3, device=dev), 1)
    cx = torch.randint(0, 16, (2, 1, 4, 6, 6), dtype=torch.uint8, device=dev)

    def run():
        outs = []
        for leaves, fn in (
            ((x, d), lambda x, d: empf_neuron(x, decay=d, threshold=0.6, spike_bits=4)[0]),
            ((x[0], v), lambda x, v: empf_neuron_step(x, v, decay=0.5, threshold=0.6)[0]),
            ((x,), lambda x: lif_neuron(x, decay=0.5, threshold=1.0)[0]),
            ((x,), lambda x: quantize_spikes(x.abs(), 4, 0.25)),
            ((a,), lambda a: binary_matmul(a, packed)),
            ((a[:1],), lambda a: binary_matmul(a, packed)),
        ):
            leaves = [t.detach().clone().requires_grad_() for t in leaves]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
            outs += [out.detach()] + [t.grad for t in leaves]
        codes = encode_spikes(x.abs(), 4, 0.25)
        outs += [codes, decode_spikes(codes, 4, 0.25, x.shape)]
        outs.append(
            binary_conv_neuron(cx, cw, torch.ones(6, device=dev), None, padding=1, in_step=0.25,
                               decay=torch.full((2, 6), 0.5, device=dev),
                               threshold=torch.full((2, 6), 0.7, device=dev), spike_bits=4)
        )  # fmt: skip
        return outs

    saved = _launch.ENABLED
    try:
        _launch.ENABLED = False
        ref = run()
        _launch.ENABLED = True
        for _ in range(2):
            for out, expected in zip(run(), ref):
                assert torch.equal(out, expected)
    finally:
        _launch.ENABLED = saved


def _stand_in_launches(monkeypatch):
    """An autotuned kernel whose launches are recorded, not run: `launch` records the call
    (`through_launch`) and caches a stand-in compiled kernel as a first launch would; the
    stand-in's `run` records the direct path's arguments (`seen`)."""
    tuner = triton.autotune([triton.Config({"BLOCK": 128})], key=["n"])(JITFunction(_add_defaults))
    launcher = _launch.Launcher(tuner)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setitem(_launch._LAUNCHERS, id(tuner), launcher)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_STREAM", lambda device: 7)
    seen, through_launch = [], []

    class _Kernel:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            seen.append(a)

    def fake_launch(tuner_, grid, args):
        through_launch.append(dict(args))
        launcher.cache.setdefault(launcher.signature(args), (_Kernel(), {"BLOCK": 128}))

    monkeypatch.setattr(_launch, "launch", fake_launch)
    return tuner, seen, through_launch


def test_bound_launch_fills_only_the_dynamic_slots_and_falls_back_on_a_new_signature(
    monkeypatch,
):
    """`BoundLaunch`: the first call goes through `launch`; later calls run the cached kernel
    with Triton's bound arguments in order, the dynamic tensors in their slots. A dynamic tensor
    of another dtype or alignment, or a launch hook, sends the call through `launch` again."""
    tuner, seen, through_launch = _stand_in_launches(monkeypatch)
    binder = _binder(tuner.fn)
    x, out = torch.zeros(64), torch.zeros(64)
    static = dict(n=64, alpha=0.5, FLAG=True)
    bound = _launch.BoundLaunch(tuner, lambda meta: (3, 2), static, ("p_x", "p_out"))
    bound(x, out)
    assert len(through_launch) == 1 and not seen
    x2, out2 = torch.ones(64), torch.ones(64)
    bound(x2, out2)
    assert len(through_launch) == 1
    expected = binder(**static, p_x=x2, p_out=out2, BLOCK=128)[0]
    assert seen[-1][:9] == (3, 2, 1, 7, "fn", "meta", None, None, None)
    assert len(seen[-1][9:]) == len(expected)
    for got, want in zip(seen[-1][9:], expected.values()):
        assert got is want or got == want
    # another alignment or dtype of a dynamic tensor: Triton's path (another specialisation)
    bound(torch.zeros(65)[1:], out2)
    bound(x2, torch.zeros(64, dtype=torch.float16))
    assert len(through_launch) == 3 and len(seen) == 1
    hook = lambda *a: None  # noqa: E731
    triton.knobs.runtime.launch_exit_hook.add(hook)
    try:
        bound(x2, out2)
    finally:
        triton.knobs.runtime.launch_exit_hook.remove(hook)
    assert len(through_launch) == 4 and len(seen) == 1
    bound(x2, out2)
    assert len(seen) == 2
    monkeypatch.setattr(_launch, "ENABLED", False)  # direct launches off: Triton's path again
    bound(x2, out2)
    assert len(through_launch) == 5 and len(seen) == 2


def test_bound_launch_fills_every_slot_of_a_tensor_given_for_several(monkeypatch):
    """A dynamic entry may name several parameters (a plan's input that also fills unused
    pointer slots): one tensor per call goes into each of them, on both paths."""
    tuner, seen, through_launch = _stand_in_launches(monkeypatch)
    binder = _binder(tuner.fn)
    static = dict(n=64, alpha=0.5, FLAG=False)
    bound = _launch.BoundLaunch(tuner, (2,), static, (("p_x", "p_out"),))
    x = torch.zeros(64)
    bound(x)
    assert len(through_launch) == 1 and through_launch[0]["p_x"] is x
    assert through_launch[0]["p_out"] is x
    x2 = torch.ones(64)
    bound(x2)
    assert len(through_launch) == 1 and len(seen) == 1
    expected = binder(**static, p_x=x2, p_out=x2, BLOCK=128)[0]
    for got, want in zip(seen[-1][9:], expected.values()):
        assert got is want or got == want
    assert sum(a is x2 for a in seen[-1][9:]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bound_launch_on_the_gpu_equals_a_plain_launch():
    tuner = triton.autotune(
        [triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n"]
    )(_jit_kernel())
    n = 300
    bound = _launch.BoundLaunch(
        tuner, lambda meta: (triton.cdiv(n, meta["BLOCK"]),),
        dict(n=n, alpha=0.5, scale_one=2.0, FLAG=True), ("p_x", "p_out"),
    )  # fmt: skip
    base = torch.randn(2 * n + 16, device="cuda")
    for x in (base[:n], base[n : 2 * n], base[1 : n + 1], base[:n]):  # aligned, aligned, not
        out = torch.full((n,), float("nan"), device="cuda")
        bound(x, out)
        torch.testing.assert_close(out, x * 0.5 + 3.0, rtol=0, atol=1e-6)


def test_bound_launch_keeps_no_tensor_of_a_call(monkeypatch):
    """A plan lives as long as its layer: it must not keep the input and output tensors of the
    calls it launched (activations) alive."""
    import gc
    import weakref

    tuner, seen, through_launch = _stand_in_launches(monkeypatch)
    bound = _launch.BoundLaunch(tuner, (1,), dict(n=64, alpha=0.5), ("p_x", "p_out"))
    refs = []
    for _ in range(3):  # the first call through `launch`, then the direct path
        x, out = torch.zeros(64), torch.zeros(64)
        bound(x, out)
        refs += [weakref.ref(x), weakref.ref(out)]
        del x, out
    assert bound._fast is not None and len(seen) == 2  # the direct path was taken
    seen.clear()  # the stand-ins' own records of the arguments they were given
    through_launch.clear()
    gc.collect()
    assert all(r() is None for r in refs)
