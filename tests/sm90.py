"""Triton's own argument binder for an H100/H200 (sm_90) target, usable without a GPU.

A launch `kernel[grid](*args, **kwargs)` goes through a binder that Triton generates per kernel: it
types every argument and specializes it (pointer alignment, integer divisibility by 16, integers equal
to 1, i32 or i64 by range) unless the kernel lists it in do_not_specialize. That specialization is
part of the compiled kernel's cache key, and it decides the code: a 16-divisible stride lets loads be
vectorized and pipelined. Calling the binder directly, with the target of the GPU rather than of the
machine's driver, shows what the GPU would compile for those arguments.
"""
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)


def jit_function(kernel) -> JITFunction:
    """The JITFunction of a kernel: itself, or under the interpreter one built from the same Python
    function and jit options (do_not_specialize included)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def bind(kernel, args, kwargs):
    """(JITFunction, bound arguments, specialization, launch options) of one launch, for sm_90.
    specialization: one (type, attribute) pair per parameter, ("constexpr", value) for constexprs."""
    jit = jit_function(kernel)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(TARGET))
    bound, specialization, options = binder(*args, **kwargs)
    return jit, bound, specialization, options


def source(kernel, args, kwargs):
    """(ASTSource, compile options, bound arguments) of one launch, as Triton's JIT builds them for
    sm_90: what triton.compile(src, target=TARGET, options=options) compiles."""
    from triton.compiler import ASTSource
    jit, bound, specialization, _ = bind(kernel, args, kwargs)
    options, signature, constexprs, attrs = jit._pack_args(make_backend(TARGET), kwargs, bound, specialization, None)
    return ASTSource(jit, signature, constexprs, attrs), options.__dict__, bound


def record_launches(drive, kernels=None):
    """Run drive() with the launches of these kernels (None: every JITFunction) recorded instead of
    executed: [(kernel, args, kwargs)] in launch order. Works for JITFunctions and interpreted kernels."""
    launches, originals = [], {}
    if kernels is None:
        originals[JITFunction] = JITFunction.run

        def record_all(self, *args, grid, warmup, **kwargs):
            launches.append((self, args, kwargs))
        JITFunction.run = record_all
    for kernel in kernels or ():
        cls = type(kernel)
        if cls not in originals:
            originals[cls] = cls.run

            def run(self, *args, grid, warmup, _original=cls.run, **kwargs):
                if any(self is k for k in kernels):
                    launches.append((self, args, kwargs))
                    return None
                return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            cls.run = run
    try:
        drive()
    finally:
        for cls, original in originals.items():
            cls.run = original
    return launches
