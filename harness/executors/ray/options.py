"""The Ray executor's settings: the matrix's `[ray]` table, the command-line options, and Ray itself
(an optional extra, imported only here, with a one-line fix when it is missing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import UserError

INSTALL_HINT = "pip install -e '.[ray]'  (or: pip install 'ray[default]>=2.40')"
NAMESPACE = "kimi-bench"
SECRET_ENV = {"tracking": "MLFLOW_TRACKING_URI", "storage": "KB_OPTUNA_STORAGE"}
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, every port on 127.0.0.1


class RaySection(BaseModel):
    """The matrix's optional `[ray]` table: how a trial is scheduled, never what it computes (no trial key)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    num_cpus: float | None = Field(default=None, gt=0)  # per trial; default: its processes on CPU, else 1
    num_gpus: float | None = Field(default=None, ge=0)  # per trial; default: its processes on CUDA, else 0
    max_retries: int = Field(default=3, ge=0)  # task retries after a lost worker or node
    checkpoint_dir: str | None = None  # shared folder for checkpoints (default: --out)


@dataclass
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else a local cluster started here (127.0.0.1 only)
    nproc: int = 1  # processes per trial (DDP through TorchTrainer when > 1)
    num_cpus: float | None = None
    num_gpus: float | None = None
    max_retries: int = 3
    checkpoint_dir: str | None = None
    local_cpus: int | None = None  # slots of a local cluster (default: every CPU)
    observer: Callable[[dict], None] | None = None  # tests: each poll's progress snapshot
    poll_s: float = 0.5

    @classmethod
    def from_matrix(cls, raw: dict[str, Any] | None, path: str = "matrix", **kwargs: Any) -> RayOptions:
        try:
            section = RaySection.model_validate(raw or {})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = (
                "unknown field; use num_cpus, num_gpus, max_retries or checkpoint_dir"
                if err["type"] == "extra_forbidden"
                else err["msg"]
            )
            raise UserError(f"{path}: ray.{where}: {msg}") from None
        return cls(
            num_cpus=section.num_cpus,
            num_gpus=section.num_gpus,
            max_retries=section.max_retries,
            checkpoint_dir=section.checkpoint_dir,
            **kwargs,
        )


def import_ray():
    """Ray, or one line saying how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray: Ray is not installed; install the extra: {INSTALL_HINT}") from None
    return ray
