"""A ``transformers.TrainerCallback`` that tracks a PEFT model's LoRA updates while it trains.

>>> from lorascope.tracking import LoraScopeCallback          # doctest: +SKIP
>>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
...                   callbacks=[LoraScopeCallback(every=10)])  # doctest: +SKIP
>>> trainer.train()   # writes <output_dir>/lorascope_tracking.h5   # doctest: +SKIP

Only the main process (``state.is_world_process_zero``) writes. Snapshots are taken at the end
of optimizer steps (after gradient accumulation), at ``state.global_step``; the final step is
always snapshotted with its factors when training ends. With ``tensorboard="auto"`` (the
default) the scalars also go to ``args.logging_dir`` when the Trainer reports to TensorBoard
and ``torch.utils.tensorboard`` can be imported.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from lorascope.tracking.tracker import Tracker

__all__ = ["LoraScopeCallback"]


def _jsonable(obj: Any) -> Any:
    return json.loads(
        json.dumps(obj, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )


class LoraScopeCallback(TrainerCallback):
    """Track every LoRA module of the Trainer's model (see :class:`Tracker`).

    Parameters
    ----------
    path : path-like, optional
        The tracking file; default ``<output_dir>/lorascope_tracking.h5``.
    every : int
        Snapshot every so many optimizer steps.
    tensorboard : {"auto", True, False} or path
        ``"auto"``: TensorBoard scalars in ``args.logging_dir`` when the Trainer reports to
        TensorBoard and it is importable; a path: there.
    **tracker_options
        ``amplify_every``, ``factors_every``, ``overwrite``, ``stall_tol`` of :class:`Tracker`.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        every: int = 10,
        *,
        tensorboard: Any = "auto",
        **tracker_options: Any,
    ) -> None:
        self.path, self.every = path, every
        self.tensorboard = tensorboard
        self.options = tracker_options
        self.tracker: Tracker | None = None
        self.result = None

    def _tensorboard(self, args) -> Any:
        tb = self.tensorboard
        if tb == "auto":
            wants = "tensorboard" in (args.report_to or []) or args.report_to == "all"
            if not wants:
                return None
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                return None
            return args.logging_dir
        if tb is True:
            return args.logging_dir
        return tb or None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.tracker is not None:
            return
        path = self.path or os.path.join(args.output_dir, "lorascope_tracking.h5")
        config: dict[str, Any] = {"trainer": _jsonable(args.to_dict())}
        peft_config = getattr(model, "peft_config", None)
        rslora = False
        if isinstance(peft_config, dict):
            config["peft"] = {name: _jsonable(c.to_dict()) for name, c in peft_config.items()}
            rslora = any(getattr(c, "use_rslora", False) for c in peft_config.values())
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tracker = Tracker(
            path,
            self.every,
            config=config,
            tensorboard=self._tensorboard(args),
            use_rslora=rslora,
            **self.options,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the Trainer logs a step's loss after that step's on_step_end (the snapshot): attach
        # it to the snapshot of the same step; a snapshot without a log at its step keeps NaN
        if self.tracker is not None and logs and "loss" in logs:
            self.tracker.log_loss(state.global_step, float(logs["loss"]))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.tracker is not None and model is not None:
            self.tracker.step(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.tracker is not None:
            self.result = self.tracker.close(model, state.global_step)
