"""A machine's fingerprint (harness.measure.fingerprint): read from /proc/cpuinfo's format, whichever CPU this
host has (the identity is set by $HARNESS_CPUINFO in each test), and when a calibration counts as this machine's."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.catalog import devices
from harness.measure import fingerprint

XEON = Path(__file__).resolve().parent / "hostsim" / "cpuinfo-xeon-amx.txt"

EPYC_BLOCK = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 26
model		: 2
model name	: AMD EPYC
stepping	: 1
flags		: fpu sse sse2 pni ssse3 fma avx f16c avx2 bmi2 avx512f avx512bw avx512vl avx_vnni avx512_bf16 hypervisor

"""

ARM_BLOCK = """processor	: 0
BogoMIPS	: 2000.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp sve i8mm bf16
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x1
CPU part	: 0xd40
CPU revision	: 1

"""


def as_host(monkeypatch, tmp_path, text: str) -> None:
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    monkeypatch.setenv("HARNESS_CPUINFO", str(p))


def test_an_intel_hosts_identity_and_the_flags_ggml_uses(monkeypatch):
    monkeypatch.setenv("HARNESS_CPUINFO", str(XEON))
    fp = fingerprint.collect(40.0, build="b")
    assert devices.cpu_model() == fp["model_name"] == "Intel(R) Xeon(R) Processor"
    assert (fp["vendor"], fp["family"], fp["model"], fp["stepping"]) == ("GenuineIntel", 6, 143, 8)
    assert {"amx_int8", "amx_tile", "avx512_vnni", "avx2"} <= set(fp["isa"])
    assert "sha_ni" not in fp["isa"] and "hypervisor" not in fp["isa"]  # only what selects ggml's kernels
    assert fp["bandwidth_gb_s"] == 40.0 and fp["llama_build"] == "b" and len(fp["id"]) == 12
    assert "amx_int8" in fingerprint.describe(fp)


def test_an_arm_hosts_features_line(monkeypatch, tmp_path):
    as_host(monkeypatch, tmp_path, ARM_BLOCK)
    fp = fingerprint.collect(None, build="b")
    assert (fp["vendor"], fp["model"], fp["stepping"]) == ("0x41", "0xd40", "1")
    assert {"asimddp", "i8mm", "sve", "bf16"} <= set(fp["isa"])


def test_two_cpus_of_one_name_are_two_machines(monkeypatch, tmp_path):
    """Hypervisors call many processors "Intel(R) Xeon(R) Processor": the name alone never matches."""
    monkeypatch.setenv("HARNESS_CPUINFO", str(XEON))
    cal = fingerprint.collect(40.0, build="b")
    as_host(monkeypatch, tmp_path, XEON.read_text().replace("model\t\t: 143", "model\t\t: 106")
            .replace(" amx_bf16 avx512_fp16 amx_tile amx_int8", ""))
    here = fingerprint.collect(40.0, build="b")
    assert here["model_name"] == cal["model_name"] and here["id"] != cal["id"]
    ok, why = fingerprint.same_machine(cal, here)
    assert not ok and "model: 143 vs 106" in why and "amx_int8" in why


def test_a_calibration_is_this_machines_only_with_its_fingerprint_and_bandwidth(monkeypatch, tmp_path):
    as_host(monkeypatch, tmp_path, EPYC_BLOCK)
    cal = fingerprint.collect(40.0, build="b")
    assert fingerprint.same_machine(cal, fingerprint.collect(44.0, build="b"))[0]  # +10%: within the band
    ok, why = fingerprint.same_machine(cal, fingerprint.collect(60.0, build="b"))
    assert not ok and "not within ±25%" in why  # one name, one fingerprint, another machine's speed
    ok, why = fingerprint.same_machine(cal, fingerprint.collect(40.0, build="another build"))
    assert not ok and "llama_build" in why
    ok, why = fingerprint.same_machine(None, fingerprint.collect(40.0, build="b"))
    assert not ok and "no machine fingerprint" in why
    ok, _ = fingerprint.same_machine(cal, fingerprint.collect(None, build="b"))
    assert not ok  # nothing measured now to compare


@pytest.mark.parametrize("text,size", [("1024K", 1 << 20), ("32768K", 32 << 20), ("2M", 2 << 20), ("x", None)])
def test_cache_sizes_as_sys_writes_them(text, size):
    assert fingerprint._size(text) == size
