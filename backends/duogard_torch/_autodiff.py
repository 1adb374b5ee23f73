"""Autodiff, vectorisation and compilation on PyTorch: torch.func with JAX's signatures."""

from __future__ import annotations

import functools

import torch
import torch.func

from duogard.tree import tree_flatten, tree_leaves, tree_map, tree_unflatten


def jvp(f, primals, tangents, has_aux=False):
    return torch.func.jvp(f, tuple(primals), tuple(tangents), has_aux=has_aux)


def vjp(f, *primals):
    return torch.func.vjp(f, *primals)


def value_and_grad(f, argnums=0, has_aux=False):
    # torch.func returns (grad, value) / (grad, (value, aux)); JAX's order is (value, grad)
    gv = torch.func.grad_and_value(f, argnums=argnums, has_aux=has_aux)

    def wrapped(*args, **kwargs):
        if _plain_autograd_ok(args, argnums):
            return _autograd_value_and_grad(f, argnums, has_aux, args, kwargs)
        g, v = gv(*args, **kwargs)
        return v, g

    return wrapped


def _plain_autograd_ok(args, argnums) -> bool:
    # torch.autograd runs a whole training step faster than torch.func, but only where it
    # cannot change the numbers: not under a torch.func transform or torch.compile, and not
    # when the inputs already belong to an autograd graph (a nested derivative)
    if not isinstance(argnums, int) or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    if torch.compiler.is_compiling():
        return False
    leaves = tree_leaves(args[argnums])
    return bool(leaves) and all(
        isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad for x in leaves
    )


def _autograd_value_and_grad(f, argnums, has_aux, args, kwargs):
    leaves, treedef = tree_flatten(args[argnums])
    inputs = [x.detach().requires_grad_(True) for x in leaves]
    args = (*args[:argnums], tree_unflatten(treedef, inputs), *args[argnums + 1 :])
    with torch.enable_grad():
        out = f(*args, **kwargs)
        value, aux = out if has_aux else (out, None)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise RuntimeError(
                f"value_and_grad: the function must return a scalar tensor, got "
                f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}"
            )
        if value.requires_grad:
            grads = torch.autograd.grad(value, inputs, allow_unused=True)
        else:  # the output does not depend on the inputs
            grads = [None] * len(inputs)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    value = value.detach()
    if has_aux:
        value = (value, tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux))
    return value, tree_unflatten(treedef, grads)


def grad_stream(f, params, *args):
    # eager autograd hands each leaf's gradient over as it is accumulated (a post-accumulate-grad
    # hook: torch's "optimizer step in the backward pass"); under a torch.func transform or
    # torch.compile the gradient is computed whole and handed over leaf by leaf
    if not _plain_autograd_ok((params,), 0):
        value, grads = value_and_grad(f)(params, *args)
        return value, functools.partial(_hand_over, tree_leaves(grads))
    leaves, treedef = tree_flatten(params)
    inputs = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        value = f(tree_unflatten(treedef, inputs), *args)
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        raise RuntimeError(
            f"grad_stream: the function must return a scalar tensor, got "
            f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}"
        )

    def backward(apply):
        done = [False] * len(inputs)

        def hook(i):
            def handed(t):
                g, t.grad = t.grad, None  # the gradient leaves with apply
                done[i] = True
                apply(i, g)

            return handed

        handles = [t.register_post_accumulate_grad_hook(hook(i)) for i, t in enumerate(inputs)]
        try:
            if value.requires_grad:
                torch.autograd.backward(value, inputs=inputs)
        finally:
            for h in handles:
                h.remove()
        for i, x in enumerate(leaves):  # params the value does not depend on: a zero gradient
            if not done[i]:
                apply(i, torch.zeros_like(x))

    return value.detach(), backward


def _hand_over(grads, apply):
    for i in reversed(range(len(grads))):  # the order of a reverse pass through a Sequential
        apply(i, grads[i])


def grad(f, argnums=0, has_aux=False):
    return torch.func.grad(f, argnums=argnums, has_aux=has_aux)


def vmap(f, in_axes=0, out_axes=0):
    return torch.func.vmap(f, in_dims=in_axes, out_dims=out_axes)


def jit(f, *, static_argnums=None, static_argnames=None, donate_argnums=None, compile=None):
    # eager unless compile is true (JAX's default is to compile); torch.compile needs no
    # static or donated arguments
    return torch.compile(f) if compile else f


def checkpoint(f):
    # non-reentrant: works with torch.autograd.grad and keyword-free calls of any arguments;
    # the RNG state is not saved (duogard draws from explicit keys)
    import torch.utils.checkpoint

    def wrapped(*args):
        if torch._C._functorch.peek_interpreter_stack() is not None:
            # torch.func's grad/vjp refuse the saved-tensor hooks checkpointing runs on: say so
            # rather than silently keeping every activation
            raise RuntimeError(
                "checkpoint: torch.utils.checkpoint cannot run under a torch.func transform (grad, "
                "vjp, vmap); duogard's backprop runs it with torch.autograd (eager torch, params "
                "that do not require grad). Use checkpoint=False under torch.func or torch.compile"
            )
        return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False, preserve_rng_state=False)

    return wrapped


def compile_count(fn):
    # eager torch compiles nothing; a duogard wrapper may count its own programs
    own = getattr(fn, "compile_count", None)
    return own() if callable(own) else None


def sum_of_squares(leaves):
    # one call for every leaf's norm (torch.optim's clip_grad_norm_ does the same), not a
    # vector_norm and a pow per leaf: eager ops cost microseconds each at small sizes
    if len(leaves) == 1 and not leaves[0].is_cuda:  # one leaf (the in-backward step's): the same bits
        return torch.linalg.vector_norm(leaves[0]).square()
    norms = torch._foreach_norm(list(leaves))
    dtype = norms[0].dtype
    if any(n.dtype != dtype for n in norms):
        dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
        norms = [n.to(dtype) for n in norms]
    return torch.stack(norms).square().sum()


def stop_gradient(x):
    return x.detach()


def is_tracing(x) -> bool:
    # is_compiling first: under torch.compile it is a constant, and dynamo cannot trace the other
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x)


def synchronize(tree=None):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return tree


def add_scaled_(target, value, scale, where=None):
    # in place: the caller owns ``target`` (a training step updating its own params); with
    # ``where`` false (a 0-d bool) nothing is written, decided on the host
    if where is not None and not bool(where):
        return target
    if isinstance(scale, torch.Tensor):
        return target.addcmul_(value, scale if scale.dtype == target.dtype else scale.to(target.dtype))
    return target.add_(value, alpha=float(scale))


def add_outer_(target, u, w, scale, where=None):
    # in place, one BLAS ger (addr_) over target viewed as (m, prod(rest)); the scale goes
    # into u (m numbers) so a 0-d tensor scale needs no host sync
    if where is not None and not bool(where):
        return target
    u = u * (scale.to(target.dtype) if isinstance(scale, torch.Tensor) else float(scale))
    target.view(target.shape[0], -1).addr_(u.to(target.dtype), w.reshape(-1).to(target.dtype))
    return target
