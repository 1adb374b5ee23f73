"""The backend contract, written once: every op's signature and its one docstring.

Each backend module implements :class:`Backend` with these names and signatures (a test checks
both built-in backends against it); its functions stay short, with a comment only where the
frameworks differ.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from duogard.backend._contract_dist import DistributedOps
from duogard.backend._contract_facts import FrameworkFacts
from duogard.backend._contract_nn import NNOps
from duogard.backend._contract_random import RandomOps
from duogard.backend._exchange import Device, ExportedArray

__all__ = ["Backend", "CONTRACT"]


class Backend(NNOps, RandomOps, DistributedOps, FrameworkFacts, Protocol):
    """What every backend module provides: the one place its ops are documented.

    Backends implement each op as a module-level function with this signature (``self`` aside;
    a test checks the names, kinds and defaults of every parameter). Arrays are the framework's
    own (``jax.Array``, ``torch.Tensor``); ``xp`` is its array-API namespace for the rest.
    Randomness takes explicit keys (:class:`~duogard.backend._contract_random.RandomOps`): the
    same key gives the same numbers on every backend. Data-parallel runs use the ops of
    :class:`~duogard.backend._contract_dist.DistributedOps`. What the front end would otherwise
    learn by naming a framework is in :class:`~duogard.backend._contract_facts.FrameworkFacts`.
    """

    #: The registered name (``"jax"``, ``"torch"``), by convention its framework's import name.
    name: str
    #: The framework's import name.
    framework: str
    #: The command that installs the backend with its framework.
    install_hint: str
    #: Whether duogard's hand-written forward rules for its own layers beat the framework's jvp.
    fast_jvp_rules: bool
    #: Whether the framework holds float64 whatever its global settings (PyTorch: True; JAX:
    #: False, only in its 64-bit mode); a parity run prefers it for its float64 reference.
    float64_always: bool
    #: Whether the framework holds all host memory as one CPU device, so that every
    #: ``("cpu", i)`` of the exchange is its CPU (PyTorch: True); False where it tells CPU devices
    #: apart (JAX: ``("cpu", i)`` is its i-th local CPU device, several with
    #: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``).
    one_host_device: bool
    #: Whether the reverse pass hands each gradient over as soon as it is complete, before the
    #: next ones exist (:meth:`grad_stream`: eager autograd, PyTorch: True), so that an update
    #: applied there frees each gradient before the pass goes on; False where one compiled
    #: program computes the whole gradient (JAX: XLA schedules the step as a whole).
    streams_gradients: bool
    #: The framework's array-API namespace (``jax.numpy``, ``array_api_compat.torch``).
    xp: Any
    #: The framework's dtypes.
    float32: Any
    float64: Any
    int32: Any
    int64: Any

    # identity and numerics

    def framework_version(self) -> str:
        """The installed framework's version string."""

    def enable_float64(self) -> None:
        """Let the framework hold and compute float64 (and int64) values.

        Call it before making arrays. JAX otherwise stores 64-bit values silently in 32 bits
        (its 64-bit mode, ``jax_enable_x64``); PyTorch needs nothing. Callers need not import a
        framework to run in float64.
        """

    def pin_float32_precision(self) -> Callable[[], None]:
        """Make float32 matmuls and convolutions use full float32 precision (no TF32).

        Returns:
            A function that restores the previous settings.
        """

    def threads_for(self, work: float) -> str:
        """Choose the framework's intra-op threads for steps of about ``work`` floating-point
        operations, and say what was chosen (for a run's header).

        torch: one thread below about 1e8 operations per step (small ops gain little from a
        second thread, and one thread waiting on a descheduled sibling slowed torch steps many
        times when another process used a core), its default count above; ``DUOGARD_TORCH_THREADS``
        overrides. JAX: XLA's own thread pool, unchanged. A backend's override, if it has one, is
        ``$DUOGARD_<NAME>_THREADS`` (read with ``authoring.threads_from_env``: the command line
        checks it before any work).
        """

    # arrays, dtypes, devices

    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is this framework's array (a traced one included).

        The answer depends on ``type(x)`` only; :func:`backend_of` asks it.
        """

    def as_dtype(self, dtype: Any) -> Any:
        """The framework's dtype for ``dtype``.

        Args:
            dtype: a name (``"float32"``, ``"bfloat16"``), a NumPy dtype, the framework's own
                dtype, or None.

        Returns:
            The framework's dtype, or None for None.

        Raises:
            TypeError: a dtype the framework does not have.
        """

    def dtype_name(self, dtype: Any) -> str:
        """The name of ``dtype`` (``"float32"``), the same on every backend."""

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        """``x`` as an array of this framework.

        Another framework's array crosses by DLPack (:meth:`dlpack_export` of its backend, then
        :meth:`dlpack_import`), zero-copy where the layout allows; asking for a narrower
        ``dtype`` allows a 64-bit source into JAX with its 64-bit mode off.

        Args:
            x: a NumPy array, a scalar, a nested sequence, or an array of any loaded backend.
            dtype: the result's dtype (anything :meth:`as_dtype` takes); None keeps x's.
            device: ``"cpu"``, ``"cuda:1"`` or the framework's device; None leaves placement to
                the framework.

        Raises:
            TypeError: a 64-bit ``dtype`` on JAX with its 64-bit mode off (see
                :meth:`enable_float64`); JAX would silently use 32 bits.
        """

    def stage(self, x: Any) -> Any:
        """A NumPy array ``x`` (a batch) in the form this framework's compiled functions take
        at the least cost: JAX keeps the NumPy array (``jit`` transfers its arguments in its
        own dispatch, about a fifth of ``jnp.asarray``'s cost); torch wraps it as a tensor
        (:meth:`asarray`). ``fit`` stages each step's batch this way. Anything other than a
        NumPy array goes through :meth:`asarray`.
        """

    def to_numpy(self, x: Any) -> Any:
        """The values of ``x`` as a NumPy array in host memory.

        Zero-copy for arrays in host memory: JAX's come back read-only, torch's share the
        tensor's (writable) memory. bfloat16 comes back as ``ml_dtypes.bfloat16``.

        Raises:
            ImportError: a bfloat16 array and ml_dtypes is not installed.
        """

    def default_device(self) -> Any:
        """The device new arrays go to by default (JAX: its first device; torch: the CPU)."""

    def device_of(self, x: Any) -> Any:
        """The framework's device holding ``x``, to pass as ``device=`` to this backend.

        None for a value traced by ``jax.jit``/``vmap``, where the transform places it.
        """

    def device_kind(self, x: Any) -> str:
        """``"cpu"`` or ``"cuda"``: where ``x`` is, in the same words on every backend."""

    # autodiff and compilation (JAX's signatures)

    def jvp(
        self, f: Callable, primals: Sequence[Any], tangents: Sequence[Any], has_aux: bool = False
    ) -> tuple:
        """Forward mode: ``f(*primals)`` and its derivative along ``tangents``.

        Returns:
            ``(out, tangent_out)``, or ``(out, tangent_out, aux)`` when ``has_aux``.
        """

    def vjp(self, f: Callable, *primals: Any) -> tuple:
        """Reverse mode: ``(f(*primals), pullback)``; ``pullback(cotangent)`` returns a tuple with
        one gradient per primal.
        """

    def value_and_grad(
        self, f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False
    ) -> Callable:
        """A function returning ``(f(...), gradient)`` (``((value, aux), gradient)`` when
        ``has_aux``), the gradient in argument ``argnums``; ``f`` returns a scalar.
        """

    def grad_stream(self, f: Callable, params: Any, *args: Any) -> tuple:
        """Reverse mode that hands the gradient over leaf by leaf: ``(value, backward)``.

        ``value`` is ``f(params, *args)``, a scalar (a plain array: the caller may read it
        before the reverse pass, e.g. to skip it for a non-finite loss). ``backward(apply)``
        runs the reverse pass and calls ``apply(index, grad)`` once for each leaf of ``params``
        (``index`` into ``tree_leaves(params)``; a leaf that ``f`` does not depend on gets
        zeros), then drops its reference to ``grad``. Where :attr:`streams_gradients`
        holds, each call comes as soon as that leaf's gradient is complete, in the order the
        pass completes them (the last layer first): the pass no longer reads that leaf of
        ``params``, so ``apply`` may overwrite it in place, and a gradient the caller lets go
        is freed before the next exists; otherwise the gradient is computed whole first (in
        one program under :meth:`jit`) and handed over in reverse leaf order. Call
        ``backward`` at most once; not calling it frees what the forward pass kept.

        PyTorch: ``torch.autograd.backward`` with a post-accumulate-grad hook on each leaf (the
        documented "optimizer step in the backward pass"); under a ``torch.func`` transform or
        ``torch.compile``, the whole gradient first. JAX: ``jax.vjp``, the whole gradient first.

        Args:
            f: ``f(params, *args) -> scalar``.
            params: the pytree to differentiate in.
            *args: the other arguments, held constant.

        Returns:
            ``(value, backward)``.
        """

    def grad(self, f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
        """A function returning the gradient of scalar ``f`` in argument ``argnums`` (and ``aux``
        after it when ``has_aux``).
        """

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """``f`` mapped over axis ``in_axes`` of its arguments, stacking results along ``out_axes``."""

    def jit(
        self,
        f: Callable,
        *,
        static_argnums: Any = None,
        static_argnames: Any = None,
        donate_argnums: Any = None,
        compile: bool | None = None,
    ) -> Callable:
        """``f`` compiled, or ``f`` itself.

        Args:
            f: the function.
            static_argnums: as for ``jax.jit`` (PyTorch needs none).
            static_argnames: as for ``jax.jit`` (PyTorch needs none).
            donate_argnums: as for ``jax.jit`` (PyTorch updates in place instead).
            compile: True compiles (``jax.jit``, ``torch.compile``); False returns ``f``; None
                is the backend's default: JAX compiles, PyTorch runs eagerly.
        """

    def checkpoint(self, f: Callable) -> Callable:
        """``f`` with its activations recomputed in the backward pass instead of stored
        (activation checkpointing, rematerialisation): the same values and gradients, less
        memory between the forward and backward passes, one more forward pass of ``f``.

        ``jax.checkpoint(f)`` (on a CPU, :meth:`jit` compiles without XLA's
        ``cse_barrier_expander`` pass, which let a later CSE merge the recomputation back into
        the forward pass); torch: ``torch.utils.checkpoint.checkpoint(f, *args,
        use_reentrant=False)`` (its random state is not restored: duogard's randomness comes
        from explicit keys, which the recomputation sees again; under a ``torch.func``
        transform, which refuses its saved-tensor hooks, it raises a RuntimeError).
        """

    def compile_count(self, fn: Callable) -> int | None:
        """How many programs ``fn`` (made by :meth:`jit`, or a wrapper with a ``compile_count()``
        method of its own) has compiled so far; None where the backend does not count (eager
        PyTorch).
        """

    def sum_of_squares(self, leaves: Sequence[Any]) -> Any:
        """``Σ_l Σ_i x_l[i]²`` over a non-empty list of arrays (a gradient's squared norm), as a
        0-d array of their promoted dtype.
        """

    def stop_gradient(self, x: Any) -> Any:
        """``x`` as a constant for differentiation."""

    def is_tracing(self, x: Any) -> bool:
        """Whether ``x`` is a traced value (inside ``jax.jit``/``grad``/``vmap``, a ``torch.func``
        transform or ``torch.compile``) rather than concrete data.
        """

    def synchronize(self, tree: Any = None) -> Any:
        """Wait until the device work that ``tree`` (or everything, on PyTorch) needs is done,
        for timing; returns ``tree``.
        """

    def add_scaled_(self, target: Any, value: Any, scale: Any, where: Any = None) -> Any:
        """``target + scale * value`` in ``target``'s dtype, written into ``target`` where the
        framework allows.

        Args:
            target: the array to update (the caller owns it).
            value: an array of ``target``'s shape.
            scale: a number or a 0-d array.
            where: None, or a 0-d bool array: where it is false, ``target`` is kept as it is.

        Returns:
            The updated array: ``target`` itself on PyTorch (updated in place), a new array on
            JAX (in place under ``jit`` with ``target`` donated).
        """

    def add_outer_(self, target: Any, u: Any, w: Any, scale: Any, where: Any = None) -> Any:
        """``target + scale * outer(u, w)`` (a rank-1 update) in ``target``'s dtype, written into
        ``target`` where the framework allows, without forming ``outer(u, w)`` where it can
        (torch: ``addr_``; JAX: fused under ``jit``).

        Args:
            target: the array to update, shape ``(m, *rest)`` (the caller owns it).
            u: shape ``(m,)``.
            w: shape ``rest``.
            scale: a number or a 0-d array.
            where: None, or a 0-d bool array: where it is false, ``target`` is kept as it is.

        Returns:
            As :meth:`add_scaled_`.
        """

    # memory

    def step_memory(self, fn: Callable, *args: Any) -> int:
        """Run ``fn(*args)`` once and return its step memory: the peak bytes of the arrays it
        allocates that are alive at once during the call.

        Arrays alive when the call starts are the baseline and are not counted (for a training
        step: the params, the optimizer state and the batch, passed in ``args``). What the call
        allocates is counted while it is alive: activations, tangents, gradients, temporaries,
        and new params or state where they are not written in place (an in-place update, or a
        program writing into a donated buffer, allocates nothing); the outputs alive when
        ``fn`` returns too. The same definition on every backend, measured as the framework
        allows:

        - JAX: at each call of a program that :meth:`jit` made, the bytes of the arrays made
          since entry that are alive (``jax.live_arrays()`` less the bytes alive at entry)
          plus the program's own temp and output bytes less those aliased to donated inputs
          (XLA's ``compiled.memory_analysis()``); the peak over the calls and the end of
          ``fn``. A step of several programs (the lean step: one per layer) is measured
          across them. Lowering a program that has already run with these shapes is a cache
          hit, not a second compile; arrays made eagerly between programs count from the
          next sample on.
        - PyTorch on a CPU: a dispatch mode over the call records the storage of every tensor
          an op returns that is none of the op's inputs' (views and in-place results are not
          new), adds its bytes, subtracts them when a weak reference sees it freed, and keeps
          the peak of the running total. A ``torch.compile``'d step runs eagerly under the
          mode: its figure is the eager step's.
        - PyTorch on CUDA (any argument on a GPU): the caching allocator's peak
          (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) less the
          bytes allocated at entry.

        Never the process's resident set size, which holds compilers, libraries and allocator
        caches. ``fn`` may update ``args`` in place or donate them: pass copies to keep them.

        Args:
            fn: the function to run once (a training step).
            *args: its arguments.

        Returns:
            The peak, in bytes (0 when the call allocates nothing).
        """

    # pytrees (duogard.tree: nested dicts/lists/tuples, dict keys sorted)

    def tree_map(self, fn: Callable, tree: Any, *rest: Any) -> Any:
        """``fn`` applied leafwise over one or more trees of the same structure."""

    def tree_leaves(self, tree: Any) -> list:
        """The leaves of ``tree``, in order."""

    def tree_flatten(self, tree: Any) -> tuple:
        """``(leaves, treedef)``; :meth:`tree_unflatten` inverts it."""

    def tree_unflatten(self, treedef: Any, leaves: Any) -> Any:
        """The tree of structure ``treedef`` with ``leaves``."""

    def tree_structure(self, tree: Any) -> Any:
        """The structure (treedef) of ``tree``."""

    # the DLPack exchange between frameworks (duogard.interop.convert orchestrates it)

    def dlpack_device(self, x: Any, *, where: Callable[[], str] | None = None) -> Device:
        """Where the memory of array ``x`` is, in the exchange's terms.

        Args:
            x: an array of this framework.
            where: names ``x`` in error messages (``convert`` passes the leaf's path).

        Returns:
            ``("cpu", index)`` (index 0 unless the framework tells CPU devices apart, see
            :attr:`one_host_device`) or ``("cuda", index)``.

        Raises:
            TypeError: ``x`` is traced (inside a transform it has no buffer to share).
            ValueError: ``x`` spans several devices, or is on a device that is neither a CPU
                nor a CUDA/ROCm GPU.
        """

    def device_problem(self, device: Device) -> str | None:
        """Why this framework cannot hold arrays on ``device`` (a :data:`Device`), or None when
        it can.
        """

    def dlpack_export(
        self,
        x: Any,
        *,
        copy: bool | None = None,
        device: Device | None = None,
        dtype: str | None = None,
        where: Callable[[], str] | None = None,
    ) -> ExportedArray:
        """Make array ``x`` ready to leave this framework, applying the source's rules.

        PyTorch detaches ``x`` (the result shares its memory; ``x`` keeps ``requires_grad``)
        and resolves a lazy conjugate or negative bit (a copy).

        Args:
            x: an array of this framework, not traced.
            copy: None copies only where a rule, ``device`` or ``dtype`` needs it; True always
                gives a new dense row-major buffer; False never copies and raises instead.
            device: a :data:`Device` to move ``x`` to first (a copy), or None.
            dtype: the name of a dtype (``"float32"``) to cast ``x`` to (a copy), or None.
            where: names ``x`` in error messages.

        Returns:
            An :class:`ExportedArray`, which any framework's ``from_dlpack`` takes.

        Raises:
            ValueError: ``copy=False`` where a copy is needed.
        """

    def dlpack_share(self, x: Any) -> tuple[Any, Device] | None:
        """The fast route of the exchange: ``x`` ready for any framework's ``from_dlpack``, or None.

        ``convert`` asks it first, leaf by leaf, for the default exchange (``copy=None``, no
        move). It answers only where no rule of either side needs more than this: a concrete,
        single-device array on a CPU or CUDA device whose memory is dense row-major and aligned
        to :data:`~duogard.backend.SHARE_ALIGNMENT` bytes (what every importer takes as is;
        JAX's 64-byte rule is the strictest), after the source's own rules that cost no copy
        (PyTorch detaches a tensor that requires grad). Everything else (traced, sharded,
        sparse, strided or misaligned arrays, lazy conjugate bits, other devices) is None, and
        ``convert`` takes the general route (:meth:`dlpack_export`, :meth:`dlpack_import`), whose
        rules copy or raise with the leaf's name. Checks cheap attributes only: no copy, no
        host synchronisation.

        Returns:
            ``(obj, device)``: what to pass to the importer and where its memory is (a
            :data:`Device`), or None.
        """

    def dlpack_importer(self, dtype: str) -> Callable[[Any], Any] | None:
        """This framework's importer for shared arrays of ``dtype`` (a name), or None.

        The importer takes an ``obj`` of another backend's :meth:`dlpack_share` and returns the
        framework's array on the same memory (its ``from_dlpack``, which passes the framework's
        stream to ``__dlpack__``). None where the destination's rules need the general route
        for that dtype now (JAX with its 64-bit mode off: 64-bit dtypes). ``convert`` keeps no
        answer across calls, so a switch of the 64-bit mode between calls is seen.
        """

    def dlpack_import(
        self,
        obj: Any,
        *,
        copy: bool | None = None,
        device: Device | None = None,
        allow_downcast: bool = False,
        where: Callable[[], str] | None = None,
    ) -> Any:
        """An array of this framework from another's, applying the destination's rules.

        Zero-copy where the rules allow. The consumer's ``from_dlpack`` passes its own stream to
        ``__dlpack__``, so the producer orders pending work on CUDA. JAX takes only compact
        layouts (dense row-major or a permutation of it) 64-byte aligned, and stores 64-bit
        values only in its 64-bit mode: other buffers are copied first (by the source framework,
        through :meth:`ExportedArray.copy`) and 64-bit values are refused unless
        ``allow_downcast``. PyTorch wraps NumPy memory directly, copying read-only or negatively
        strided arrays.

        Args:
            obj: an :class:`ExportedArray` (from any backend's :meth:`dlpack_export`, this one's
                included) or a NumPy array.
            copy: None shares memory wherever the rules allow; True gives memory of its own (a
                ``fresh`` export is kept); False never copies and raises instead.
            device: a :data:`Device` to move the result to after the import (a copy), or None.
            allow_downcast: JAX with its 64-bit mode off: cast 64-bit values to 32 bits instead
                of raising.
            where: names ``obj`` in error messages.

        Returns:
            The framework's array.

        Raises:
            TypeError: a 64-bit ``obj`` that the framework would store in 32 bits, without
                ``allow_downcast``.
            ValueError: ``copy=False`` where a copy is needed.
        """


def _contract(protocol: type) -> tuple[str, ...]:
    """The public names a protocol class and its protocol bases declare: attributes, then methods."""
    parts = [c for c in reversed(protocol.__mro__) if c.__module__.startswith("duogard.backend")]
    attributes = [n for c in parts for n in inspect.get_annotations(c) if not n.startswith("_")]
    methods = [
        n for c in parts for n, v in vars(c).items() if inspect.isfunction(v) and not n.startswith("_")
    ]
    return (*attributes, *methods)


#: Public names every backend module defines, from :class:`Backend` (a test checks both built-in
#: backends against it, signatures included).
CONTRACT: tuple[str, ...] = _contract(Backend)
