"""``MoEAuxLossCallback``: adds the AdaMoE load-balancing loss to the training loss in ``Trainer``.

One mechanism for every MoE family: at ``on_train_begin`` the callback puts a forward hook on
the model (a torch extension point; no transformers class is patched). After each training
forward that produced a loss, the hook adds :func:`moe.adamoe_aux_loss` — each AdaMoE
router's coefficient times its load-balancing loss, averaged over layers, from the routing that
forward just did — to ``outputs.loss``, so ``Trainer`` back-propagates both.

Gradient accumulation and token averaging: when ``Trainer`` passes ``num_items_in_batch`` (HF
causal LMs), it no longer divides the loss by the accumulation steps and multiplies it by the
number of processes when ``average_tokens_across_devices``; the hook scales the aux term by
the inverse so every optimizer step sees it once, as with plain ``loss / steps``.

Losses computed outside the model (``Trainer``'s ``compute_loss_func``, e.g. ACM's
``budget_loss``) bypass ``outputs.loss``: pass the loss function through :meth:`MoEAuxLossCallback.wrap`
(``compute_loss_func=callback.wrap(budget_loss(model, config))``) and it gets the term, scaled
as ``Trainer`` scales such a loss. A training forward that returns no loss with the loss function
not wrapped (or with label smoothing) is an error, never a silently dropped aux loss.
"""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["MoEAuxLossCallback"]


class MoEAuxLossCallback(TrainerCallback):
    """Add the AdaMoE aux loss to ``Trainer``'s loss; logs its mean as ``moe_aux_loss``."""

    def __init__(self) -> None:
        self._handle = None
        self._scale = 1.0
        self._accumulation = 1
        self._sum = 0.0
        self._count = 0
        self._wrapped = False
        self._pending = None  # the aux term of the last training forward, for the wrapped loss function

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from moe import adamoe_routers

        if model is None or not adamoe_routers(model):
            raise ValueError("MoEAuxLossCallback: the model has no AdaMoE routers (moe.inject_adamoe first)")
        processes = args.world_size if args.average_tokens_across_devices else 1
        self._scale = 1.0 / (args.gradient_accumulation_steps * processes)
        self._accumulation = args.gradient_accumulation_steps
        self._handle = model.register_forward_hook(self._add_aux_loss, with_kwargs=True)

    def _add_aux_loss(self, module, args, kwargs, output):
        from moe import adamoe_aux_loss

        if not module.training:
            return output
        aux = adamoe_aux_loss(module)
        if aux is None:
            return output
        self._sum += aux.item()
        self._count += 1
        loss = getattr(output, "loss", None)
        if loss is None:
            if not self._wrapped:
                raise ValueError(
                    "MoEAuxLossCallback: the training forward returned no loss (Trainer computes it outside the model: "
                    "compute_loss_func or label smoothing), so the AdaMoE aux loss would be dropped; pass "
                    "compute_loss_func=callback.wrap(your_loss_func) (label smoothing is not supported with AdaMoE)"
                )
            self._pending = aux
            return output
        scale = self._scale if kwargs.get("num_items_in_batch") is not None else 1.0
        output.loss = loss + scale * aux.to(loss.device, loss.dtype)
        return output

    def wrap(self, compute_loss_func):
        """``compute_loss_func`` for ``Trainer`` that adds the aux term of the forward it scores.

        ``Trainer`` neither divides such a loss by the accumulation steps nor (without
        ``num_items_in_batch``) multiplies it by the processes, so the term is scaled here.
        """
        self._wrapped = True

        def compute_loss(outputs, labels, num_items_in_batch=None):
            loss = compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
            if self._pending is None:  # evaluation, or a model with no AdaMoE routing this step
                return loss
            aux, self._pending = self._pending, None
            scale = self._scale if num_items_in_batch is not None else 1.0 / self._accumulation
            return loss + scale * aux.to(loss.device, loss.dtype)

        return compute_loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._count:
            logs["moe_aux_loss"] = self._sum / self._count
            self._sum, self._count = 0.0, 0
            # Trainer appended a copy of ``logs`` (plus "step") to log_history before calling us
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step:
                last["moe_aux_loss"] = logs["moe_aux_loss"]

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
