"""Station configuration: pure pydantic models, one module per section, and the TOML loader.

Models describe; they never open files, sockets or outboxes (the station builds those from them).
"""

from smearscope.service.config.analysis import AnalysisConfig
from smearscope.service.config.base import StationBaseModel
from smearscope.service.config.clinic import FhirConfig, ReviewConfig
from smearscope.service.config.loader import (
    ENV_PREFIX,
    EXIT_CONFIG,
    ConfigError,
    apply_env_overrides,
    load_config,
    parse_config,
    print_config_errors,
)
from smearscope.service.config.mqtt import MqttConfig, MqttTlsConfig
from smearscope.service.config.outbox import OutboxConfig, OverflowPolicy
from smearscope.service.config.specimen import SpecimenConfig
from smearscope.service.config.station import StationConfig
from smearscope.service.config.watchdog import WatchdogConfig

__all__ = [
    "ENV_PREFIX",
    "EXIT_CONFIG",
    "AnalysisConfig",
    "ConfigError",
    "FhirConfig",
    "MqttConfig",
    "MqttTlsConfig",
    "OutboxConfig",
    "OverflowPolicy",
    "ReviewConfig",
    "SpecimenConfig",
    "StationBaseModel",
    "StationConfig",
    "WatchdogConfig",
    "apply_env_overrides",
    "load_config",
    "parse_config",
    "print_config_errors",
]
