"""Backdoor triggers and dataset poisoning."""

from ubt_core.attacks.poison import PoisonConfig, poison_dataset, read_manifest
from ubt_core.attacks.triggers import ATTACKS, TriggerSpec, make_trigger, trigger_from_dict

__all__ = ["ATTACKS", "PoisonConfig", "TriggerSpec", "make_trigger", "poison_dataset", "read_manifest",
           "trigger_from_dict"]
