"""Named failures. Every runtime check raises one of these, never a bare assert.

At the network edge (client/, strategies/) a failure becomes an error reply or a
logged rejection with its reason; the round goes on without it.
"""

from __future__ import annotations


class FedretrainError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(FedretrainError, ValueError):
    """A config key is unknown, has the wrong type or an invalid value.

    The message always names the dotted key (``privacy.target_epsilon``).
    """


class DataValidationError(FedretrainError, ValueError):
    """A site's data file breaks the schema.

    Attributes name where: ``path``, ``line`` (1-based, or None for the whole
    file) and ``field`` (or None).
    """

    def __init__(self, path: str, line: int | None, field: str | None, reason: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {reason}".replace(":  ", ": "))


class ModelLoadError(FedretrainError, RuntimeError):
    """A base model could not be loaded from a directory or hub id."""


class AdapterMismatchError(FedretrainError, ValueError):
    """Adapter tensors do not match the expected keys, shapes, dtypes or are not finite."""


class PrivacyBudgetExceeded(FedretrainError, RuntimeError):
    """Training would take a site past its lifetime epsilon ceiling."""


class LedgerError(FedretrainError, RuntimeError):
    """A site's privacy ledger is unreadable or belongs to another accountant/delta."""


class TrainingError(FedretrainError, RuntimeError):
    """Local training failed a guard (e.g. LoRA weights never changed: opacus#820)."""


class ReplyRejected(FedretrainError, ValueError):
    """A client reply failed validation and is left out of aggregation."""


class SimulationFailed(FedretrainError, RuntimeError):
    """A simulated run ended without writing its summary (the log says why)."""


class RegistryError(FedretrainError, RuntimeError):
    """The coordinator's model registry is missing, inconsistent, or refuses an operation."""


class CycleBusy(FedretrainError, RuntimeError):
    """Another retraining cycle holds the registry's cycle lock; two never run at once."""


class KeyFileError(FedretrainError, RuntimeError):
    """A key file is missing, unreadable, of the wrong type, or would be overwritten."""


class VerificationError(FedretrainError, ValueError):
    """A published version (or rollback record) failed a check; nothing is installed.

    ``check`` names the failed check (``signature``, ``hashes``, ``version``,
    ``expiry``, ``safetensors``, ``shapes``, ``finite``, ``base_model``,
    ``manifest``, ``rollback``, ``smoke_eval``); the message says why.
    """

    def __init__(self, check: str, reason: str):
        self.check = check
        self.reason = reason
        super().__init__(f"{check}: {reason}")


class QuorumLost(FedretrainError, RuntimeError):
    """A round closed at its deadline with fewer sites than the quorum; the cycle publishes nothing."""


class ResumeError(FedretrainError, RuntimeError):
    """A cycle cannot be resumed: no complete checkpoint, or the registry moved since it was written."""


class DeployError(FedretrainError, RuntimeError):
    """A Flower deployment command (SuperLink, SuperNode, the flwr CLI) failed; the message says how."""


class TrackingError(FedretrainError, RuntimeError):
    """Exporting a run to MLflow or TensorBoard failed: a run file that cannot be read (the
    message names the file and line), a tracker that refuses or cannot be reached, or its
    package not installed. An export only reads the run directory and the registry."""


class EvaluationRefused(FedretrainError, RuntimeError):
    """A site will not score this adapter: not the aggregate of a round it trained in, a
    second candidate for one round, or a baseline that is not the version it installed."""


# A site's error replies: the code for each failure it means; the coordinator logs code and reason.
ERROR_CODES: dict[type[Exception], int] = {
    DataValidationError: 4101,
    PrivacyBudgetExceeded: 4102,
    LedgerError: 4103,
    ModelLoadError: 4104,
    AdapterMismatchError: 4105,
    ConfigError: 4106,
    TrainingError: 4107,
    VerificationError: 4108,
    EvaluationRefused: 4109,
}
UNEXPECTED_ERROR = 4199
