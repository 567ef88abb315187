"""The XLA:CPU flag the package sets before JAX starts: added when absent, never over the user's."""

from __future__ import annotations

import os
import subprocess
import sys

from dirl_jax import xla_cpu


def test_the_ynn_flag_is_added_to_other_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    xla_cpu.apply_defaults()
    assert xla_cpu.YNN_VALUE == "-reduce,-eltwise"
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=-reduce,-eltwise")


def test_a_value_the_user_set_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+dot")
    xla_cpu.apply_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+dot"


def test_importing_the_package_sets_it_before_jax_starts():
    code = ("import os; os.environ.pop('XLA_FLAGS', None); import dirl_jax, jax; jax.devices(); "
            "print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "--xla_cpu_experimental_ynn_fusion_type=-reduce,-eltwise"
