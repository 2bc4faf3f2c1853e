"""DeepSpeed's monitors as this runtime drives them: TensorBoard, CSV, Weights & Biases, Comet.

A monitor is a section of the DeepSpeed config (``"tensorboard"``, ``"csv_monitor"``, ``"wandb"``,
``"comet"``); DeepSpeed builds them on rank 0 inside ``deepspeed.initialize`` and the trainer writes its
events through ``engine.monitor``. What this module adds, per section, to what DeepSpeed (0.19) takes:

* ``fill_monitor_sections``: the "auto" entries each section's schema has (checked against DeepSpeed's
  own pydantic models, so a key DeepSpeed would reject is an error naming the section, the key and the
  keys it takes): tensorboard / csv_monitor ``output_path`` = ``<output_dir>/logs`` and ``job_name`` = the
  job's name; wandb ``project`` = ``lxmert-fast`` and ``group`` = the job's name; comet ``project`` =
  ``lxmert-fast``, ``experiment_name`` = the job's name and ``samples_log_interval`` = 1.
* ``monitor_environment``: where W&B and Comet write locally. DeepSpeed's wandb and comet sections have
  no directory; both libraries read one from the environment, so while the engine (and with it the
  monitors) is built, ``WANDB_DIR`` defaults to ``<output_dir>/logs`` (the run lands in
  ``logs/wandb/<run>``) and ``COMET_OFFLINE_DIRECTORY`` to ``<output_dir>/logs/comet``; values the user
  set win, and the environment is restored afterwards. Offline use: ``WANDB_MODE=offline`` (DeepSpeed's
  wandb section has no mode) and comet's ``"online": false``.
* ``adapt_monitors``: W&B keeps one step counter per run and drops whatever is logged at a smaller step.
  DeepSpeed's own events (``Train/Samples/*``) count samples; the trainer's count optimizer steps, so
  through DeepSpeed's wandb monitor the trainer's events would all be dropped after the first step. The
  adapter logs each event with its own x-axis metric instead (``wandb.define_metric``): ``samples`` for
  ``Train/Samples/*``, ``step`` for everything else, one W&B row per (axis, x) of a batch of events.
* ``close_monitors``: finish the W&B run and end the Comet experiment when the job ends (offline: the
  run directory / the experiment's archive is complete when the job returns, also in-process).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

from lxmert_fast.train.ds_auto import AUTO, DSConfigError

PROJECT = "lxmert-fast"
SECTIONS = ("tensorboard", "csv_monitor", "wandb", "comet")
SAMPLES_AXIS = "samples"  # the x-axis metric of DeepSpeed's own events in W&B
STEP_AXIS = "step"        # the x-axis metric of the trainer's events (optimizer steps)
DEEPSPEED_EVENT_PREFIX = "Train/Samples/"


# What the torch engine (lxmert_fast.train.torch_engine.FileMonitor) reads of the sections it writes.
TORCH_ENGINE_KEYS = {"tensorboard": ["enabled", "output_path", "job_name"],
                     "csv_monitor": ["enabled", "output_path", "job_name"]}


def _schema_keys(section: str, engine: str = "deepspeed") -> list[str]:
    if engine == "torch":
        return TORCH_ENGINE_KEYS.get(section, ["enabled"])
    from deepspeed.monitor import config as mc  # DeepSpeed's own schema (only where its engine runs)

    model = {"tensorboard": mc.TensorBoardConfig, "csv_monitor": mc.CSVConfig, "wandb": mc.WandbConfig,
             "comet": mc.CometConfig}[section]
    return list(model.model_fields)


def _fills(section: str, output_dir: str, job_name: str) -> dict[str, object]:
    logs = os.path.join(output_dir, "logs")
    return {
        "tensorboard": {"output_path": logs, "job_name": job_name},
        "csv_monitor": {"output_path": logs, "job_name": job_name},
        "wandb": {"project": PROJECT, "group": job_name},
        "comet": {"project": PROJECT, "experiment_name": job_name, "samples_log_interval": 1},
    }[section]


_WHERE = {
    "wandb": "the run directory is $WANDB_DIR (default <output_dir>/logs), the run's name $WANDB_NAME, offline "
             "mode WANDB_MODE=offline",
    "comet": "the offline directory is $COMET_OFFLINE_DIRECTORY (default <output_dir>/logs/comet)",
    "tensorboard": "", "csv_monitor": "",
}


def fill_monitor_sections(cfg: dict, *, output_dir: str, job_name: str, engine: str = "deepspeed") -> None:
    """Fill, in place, the "auto" entries of the monitor sections ``cfg`` has; raise DSConfigError on a
    key DeepSpeed's schema for that section does not have (the torch engine: a key it does not read), or an
    "auto" this runtime cannot fill."""
    for section in SECTIONS:
        mon = cfg.get(section)
        if mon is None:
            continue
        if not isinstance(mon, dict):
            raise DSConfigError(f"DeepSpeed config: {section} = {mon!r}: expected an object")
        known = _schema_keys(section, engine)
        unknown = sorted(set(mon) - set(known))
        if unknown and (engine == "deepspeed" or mon.get("enabled")):  # the torch engine reads enabled ones only
            where = f"; {_WHERE[section]}" if _WHERE[section] else ""
            raise DSConfigError(f"DeepSpeed config: {section}.{unknown[0]}: DeepSpeed's {section} section has no such "
                                f"key (it takes {', '.join(known)}){where}")
        fills = _fills(section, output_dir, job_name)
        for key, value in mon.items():
            if value == AUTO:
                if key not in fills:
                    raise DSConfigError(f"DeepSpeed config: {section}.{key} = \"auto\": nothing fills it; set a value "
                                        f"(\"auto\" fills {', '.join(sorted(fills))})")
                mon[key] = fills[key]


def _enabled(cfg: dict, section: str) -> bool:
    return bool(cfg.get(section, {}).get("enabled", False))


@contextlib.contextmanager
def monitor_environment(cfg: dict, output_dir: str, log: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """While the engine is built: W&B's and Comet's local directories under ``<output_dir>/logs`` unless the
    environment names them (see the module's docstring); the environment as it was afterwards."""
    wanted: dict[str, str] = {}
    logs = os.path.join(output_dir, "logs")
    if _enabled(cfg, "wandb"):
        wanted["WANDB_DIR"] = logs
    if _enabled(cfg, "comet"):
        wanted["COMET_OFFLINE_DIRECTORY"] = os.path.join(logs, "comet")
    saved = {key: os.environ.get(key) for key in wanted}
    try:
        for key, value in wanted.items():
            if not os.environ.get(key):
                os.makedirs(value, exist_ok=True)
                os.environ[key] = value
        if log is not None and _enabled(cfg, "wandb"):
            mode = os.environ.get("WANDB_MODE") or "online (WANDB_MODE=offline for none)"
            log(f"W&B monitor: project {cfg['wandb'].get('project', 'deepspeed')}, mode {mode}, run directory under "
                f"{os.path.join(os.environ['WANDB_DIR'], 'wandb')}")
        if log is not None and _enabled(cfg, "comet"):
            online = cfg["comet"].get("online")
            where = "offline, archive under " + os.environ["COMET_OFFLINE_DIRECTORY"] if online is False else "online"
            log(f"Comet monitor: project {cfg['comet'].get('project')}, {where}")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WandbAxes:
    """Stands in for DeepSpeed's WandbMonitor in ``engine.monitor``: each event is logged against its own
    x-axis metric (``samples`` for DeepSpeed's ``Train/Samples/*``, ``step`` for the trainer's), never as W&B's
    run step, which must only grow (see the module's docstring)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.enabled = inner.enabled
        self._defined: set[str] = set()

    @staticmethod
    def axis_of(name: str) -> str:
        return SAMPLES_AXIS if name.startswith(DEEPSPEED_EVENT_PREFIX) else STEP_AXIS

    def write_events(self, event_list) -> None:
        import wandb  # optional: the wandb package, for the W&B monitor

        if not self.enabled or wandb.run is None:
            return
        rows: dict[tuple[str, float], dict[str, object]] = {}
        for name, value, x in event_list:
            axis = self.axis_of(name)
            if name not in self._defined:
                if axis not in self._defined:
                    wandb.define_metric(axis, hidden=True)
                    self._defined.add(axis)
                wandb.define_metric(name, step_metric=axis)
                self._defined.add(name)
            rows.setdefault((axis, x), {})[name] = value
        for (axis, x), values in rows.items():
            wandb.log({axis: x, **values})


def adapt_monitors(engine) -> None:
    """Put `WandbAxes` in place of DeepSpeed's W&B monitor (rank 0, where one was built)."""
    master = getattr(engine, "monitor", None)
    inner = getattr(master, "wandb_monitor", None)
    if inner is not None and not isinstance(inner, WandbAxes):
        master.wandb_monitor = WandbAxes(inner)


def close_monitors(engine) -> None:
    """Finish the W&B run and end the Comet experiment this engine's monitors started (rank 0)."""
    master = getattr(engine, "monitor", None)
    if master is None:
        return
    if hasattr(master, "close"):  # the torch engine's FileMonitor
        master.close()
    if getattr(master, "wandb_monitor", None) is not None:
        import wandb  # optional: the wandb package, for the W&B monitor

        if wandb.run is not None:
            wandb.finish()
    comet = getattr(master, "comet_monitor", None)
    experiment = getattr(comet, "experiment", None) if comet is not None else None
    if experiment is not None:
        experiment.end()
