"""Compile every kernel launch for a GPU target without a GPU (run as a script, not under pytest).

The interpreter runs kernels as numpy and misses errors only the compiler sees (an integer argument
equal to 1 specialised to a Python int, a reshape the layout pass rejects, ...). This script imports
the kernels with the interpreter OFF, replaces the autotuner's launch by a compile for
`GPUTarget("cuda", 90, 32)` (Hopper, as the lent GPUs), calls the launchers with CPU tensors of
each dtype and each constexpr variant, and prints one line per compiled variant. Exit status 0
means every variant compiled to a cubin.

Usage: TRITON_INTERPRET=0 python tests/gpu_compile.py [op ...]
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0"
# The launchers must go through the patched Triton entry points below, not the direct path.
os.environ["EMPF_FAST_LAUNCH"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}
compiled: set[tuple] = set()
seen: set[str] = set()


def _compile(fn, kwargs: dict, config: triton.Config) -> None:
    args = {**kwargs, **config.kwargs}
    sig, const = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in args:  # a default
            continue
        v = args[name]
        if i in fn.constexprs or name in config.kwargs:
            sig[name] = "constexpr"
            const[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # Triton specialises integer arguments equal to 1 into constants
                sig[name] = "constexpr"
                const[(i,)] = 1
            else:
                sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name] = "constexpr"
            const[(i,)] = None
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={v!r}")
    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, const.items()))))
    if key in compiled:
        return
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    for opt in ("enable_fp_fusion", "num_warps", "num_stages"):
        if opt in kwargs:
            options[opt] = kwargs[opt]
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const), target=TARGET, options=options
    )
    assert "cubin" in kernel.asm, fn.__name__
    compiled.add(key)
    print(f"compiled {fn.__name__} {config}", flush=True)


def _fake_run(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    if args:
        raise TypeError("launch kernels with keyword arguments")
    fn = self.fn
    extra = {k: kwargs.pop(k) for k in ("enable_fp_fusion",) if k in kwargs}
    # Every config for the first variant of a kernel, then the pinned config for the others
    # (the configs differ in block sizes, the variants in constexpr branches and dtypes).
    first = fn.__name__ not in seen
    seen.add(fn.__name__)
    for config in self.configs if first else self.configs[:1]:
        _compile(fn, {**kwargs, **extra}, config)


def _fake_getitem(self, grid):
    """A plain (not autotuned) kernel launch: compile it with Triton's default launch options."""

    def launch(*args, **kwargs):
        if args:
            raise TypeError("launch kernels with keyword arguments")
        _compile(self, kwargs, triton.Config({}, num_warps=4, num_stages=3))

    return launch


def _fake_jit_run(self, *args, grid=None, warmup=False, **kwargs):
    """A plain kernel launched through `JITFunction.run` (what kernels/_launch.py calls)."""
    _fake_getitem(self, grid)(*args, **kwargs)


Autotuner.run = _fake_run
JITFunction.__getitem__ = _fake_getitem
JITFunction.run = _fake_jit_run


def neuron_cases():
    from empf_triton.kernels import neuron as k

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for T, N in ((1, 1), (3, 1000)):
            cur = torch.zeros(T, N, dtype=dtype)
            v0 = torch.zeros(N, dtype=dtype)
            p = torch.zeros(T)
            for bits in (None, 4):
                for has_v0 in (False, True):
                    k.empf_fwd(cur, v0 if has_v0 else None, p, p, bits, 0.25, True, True)
                k.empf_fwd(cur, None, p, p, bits, 0.25, False, False)
                k.parallel_fwd(cur, p, bits, 0.25, True)
            mask = torch.zeros(T, (N + 7) // 8, dtype=torch.uint8)
            vh = torch.zeros(max(T - 1, 1), N, dtype=dtype)
            for bptt in (False, True):
                for need in (False, True):
                    k.empf_bwd(
                        cur,
                        v0,
                        mask,
                        vh if need else None,
                        v0 if need else None,
                        p if bptt else None,
                        N,
                        dtype,
                        bptt,
                        need,
                        bptt and need,
                    )
            k.empf_bwd(None, None, mask, None, None, None, N, dtype, False, False, False)
            k.parallel_bwd(cur, mask, N)
            _neuron_param_forms(k, cur, v0, mask, vh, dtype, T, N)


def _neuron_param_forms(k, cur, v0, mask, vh, dtype, T, N) -> None:
    """The parameter forms beside per-step tensors: float scalars (MODE 0), per-channel [T, C]
    tensors (MODE 2), and a module's logit vector read at a step row t0 (LOGITS)."""
    C, inner = (5, 2) if N == 1000 else (1, 1)
    pc = torch.zeros(T, C)
    lg = torch.zeros(6)
    # float scalars
    k.empf_fwd(cur, v0, 0.5, 0.3, 4, 0.25, True, True)
    k.empf_bwd(cur, v0, mask, vh, v0, 0.5, N, dtype, True, False, True, threshold=0.3)
    k.parallel_fwd(cur, 0.3, None, 0.25, True)
    k.parallel_bwd(cur, mask, N, threshold=None, need_dthreshold=False)
    # per channel
    k.empf_fwd(cur, None, pc, pc, None, 0.25, True, True, channels=C, inner=inner)
    k.empf_bwd(
        cur, v0, mask, vh, v0, pc, N, dtype, True, True, True,
        threshold=pc, channels=C, inner=inner,
    )  # fmt: skip
    k.parallel_fwd(cur, pc, 4, 0.25, True, channels=C, inner=inner)
    k.parallel_bwd(cur, mask, N, threshold=pc, channels=C, inner=inner)
    # a deployed Mem-BN neuron: the input map k I + b inside the forward (inference)
    per_step = torch.zeros(T)
    for d, th in ((pc, pc), (pc, 0.3), (per_step, per_step)):
        for bits in (None, 4):
            k.empf_fwd(
                cur, None, d, th, bits, 0.25, False, False, channels=C, inner=inner,
                in_scale=pc, in_bias=pc,
            )  # fmt: skip
    # logits with a step row
    k.empf_fwd(cur, v0, lg, lg, 4, 0.25, True, True, t0=2, logits=True)
    for bptt in (False, True):
        k.empf_bwd(
            cur, None, mask, vh, v0, lg, N, dtype, bptt, True, False,
            threshold=lg, t0=2, logits=True,
        )  # fmt: skip
    k.parallel_fwd(cur, lg, 4, 0.25, True, t0=2, logits=True)
    k.parallel_bwd(cur, mask, N, threshold=lg, t0=2, logits=True)


def lif_cases():
    from empf_triton.kernels import lif as k

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for T, N in ((1, 1), (3, 1000)):
            cur = torch.zeros(T, N, dtype=dtype)
            v0 = torch.zeros(N, dtype=dtype)
            p = torch.zeros(T)
            for has_v0 in (False, True):
                k.lif_fwd(cur, v0 if has_v0 else None, p, p, True)
            k.lif_fwd(cur, None, p, p, False)
            for surrogate in k.SURROGATE_IDS:
                for detach_reset in (False, True):
                    for bptt in (False, True):
                        k.lif_bwd(
                            cur,
                            v0,
                            cur,
                            v0,
                            p,
                            p,
                            surrogate,
                            4.0,
                            detach_reset,
                            bptt,
                            True,
                            bptt,
                            True,
                            True,
                        )
            k.lif_bwd(
                cur, None, cur, None, p, p, "sigmoid", 4.0, False, False, True, False, False, False
            )
            # float decay and/or threshold: kernel scalars (what LIFNeuron passes)
            for d, th in ((0.5, 1.0), (0.5, p), (p, 1.0)):
                for save_h in (False, True):
                    k.lif_fwd(cur, v0, d, th, save_h)
                for bptt in (False, True):
                    learn_d, learn_th = type(d) is not float, type(th) is not float
                    k.lif_bwd(
                        cur, None, cur, v0, d, th, "sigmoid", 4.0, False, bptt, True, bptt,
                        learn_d, learn_th,
                    )  # fmt: skip


def spikes_cases():
    from empf_triton.kernels import spikes as k

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = torch.zeros(1000, dtype=dtype)
        k.quantize_spikes_fwd(s, 4, 0.25)
        for bits in (1, 2, 4, 8):
            codes = k.encode_spikes_fwd(s, bits, 0.25)
            k.decode_spikes_fwd(codes, bits, 0.25, 1000, dtype)


def binary_cases():
    from empf_triton.kernels import binary as k

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for bits in (1, 2):
            for M, N, K in ((1, 17, 300), (5, 64, 70), (130, 64, 70)):  # GEMV, small, large
                x = torch.zeros(M, K, dtype=dtype)
                words = torch.zeros(bits, N, (K + 31) // 32, dtype=torch.int32)
                scale = torch.zeros(N)
                k.binary_gemm(x, words, scale, torch.zeros(N, dtype=dtype))
                k.binary_gemm(x, words, scale, None)
                k.binary_gemm_t(torch.zeros(M, N, dtype=dtype), words, scale, K)
            w = torch.zeros(7, 40, dtype=dtype)
            delta = torch.zeros(1) if bits == 2 else None
            k.quantize_weight(w, bits)
            k.quantize_weight(torch.zeros(3, 5000, dtype=dtype), bits)  # several steps / programs
            k.weight_stats(w, bits)
            k.pack(w, delta)
            k.pack_with_stats(w, bits)
            k.pack_with_stats(torch.zeros(3, 5000, dtype=dtype), bits)  # several row blocks
            k.unpack(torch.zeros(bits, 7, 2, dtype=torch.int32), torch.zeros(7), 40, dtype)
        k.ste_grad(torch.zeros(7, 40, dtype=dtype), torch.zeros(7, 40, dtype=dtype))


def binary_conv_cases():
    from empf_triton.kernels import binary_conv as k

    def launch(x, bits, C_out, groups, neuron, spike_bits, out_dtype, bias, in_bits=8, T=2,
               residual=None):  # fmt: skip
        C_in = x.shape[2]
        words = torch.zeros(bits, C_out, (C_in // groups * 9 + 31) // 32, dtype=torch.int32)
        p = torch.zeros(T, C_out)
        k.binary_conv_neuron_fwd(
            x,
            words,
            (C_out, C_in // groups, 3, 3),
            torch.zeros(C_out),
            torch.zeros(C_out) if bias else None,
            p if neuron == "empf" else None,
            p if neuron != "current" else None,
            stride=(1, 1),
            padding=(1, 1),
            groups=groups,
            in_step=0.25 if x.dtype == torch.uint8 else None,
            in_bits=in_bits,
            parallel=neuron == "parallel",
            spike_bits=spike_bits,
            spike_step=0.25,
            out_dtype=out_dtype,
            residual=residual,
        )

    codes = torch.zeros(2, 2, 64, 8, 8, dtype=torch.uint8)
    # the residual join of a deployed block: per step or broadcast over T, in each float dtype
    for res_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for steps in (1, 2):
            res = torch.zeros(steps, 2, 64, 8, 8, dtype=res_dtype)
            launch(codes, 1, 64, 1, "current", None, res_dtype, True, 4, residual=res)
    launch(codes, 1, 64, 1, "empf", 4, torch.float32, True, 4, residual=torch.zeros(2, 2, 64, 8, 8))
    for in_bits in (4, 8):  # int8 dots, fp16 dots
        for bits in (1, 2):
            for neuron in ("empf", "parallel"):
                launch(codes, bits, 64, 1, neuron, 4, torch.float32, True, in_bits)
            launch(codes, bits, 64, 1, "empf", None, torch.float16, False, in_bits)
            launch(codes, bits, 64, 1, "current", None, torch.float32, True, in_bits)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.zeros(2, 2, 64, 8, 8, dtype=dtype)
        for out_dtype in (torch.float32, torch.bfloat16):
            launch(x, 1, 64, 1, "empf", None, out_dtype, True)
        launch(x, 2, 64, 1, "parallel", 2, torch.float32, False)
        launch(x, 1, 64, 1, "current", None, dtype, True)
    # T = 1, depthwise (one channel per group) and grouped convolutions: integer arguments equal
    # to 1 become constants.
    dw = torch.zeros(1, 1, 16, 5, 5, dtype=torch.uint8)
    launch(dw, 1, 16, 16, "empf", 4, torch.float32, True, 4, T=1)
    grouped = torch.zeros(2, 1, 16, 5, 5, dtype=torch.float16)
    launch(grouped, 2, 32, 2, "parallel", None, torch.float16, False)


CASES = {
    "neuron": neuron_cases,
    "lif": lif_cases,
    "spikes": spikes_cases,
    "binary": binary_cases,
    "binary_conv": binary_conv_cases,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    for name in names:
        CASES[name]()
    print(f"OK: {len(compiled)} kernel variants compiled for {TARGET}")
