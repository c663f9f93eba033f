"""Device catalog (memory and spec-sheet bandwidth of common GPUs and Apple silicon) and a CPU bandwidth probe.

The catalog answers "what bandwidth does the page's formula use for this device": by the name a person types
("RTX 4090", "h100"), or the name NVML reports ("NVIDIA H100 80GB HBM3"). Bandwidths are the vendors' spec
sheets (peak, not achieved). Apple entries carry the largest memory configuration of each chip.

:func:`measure_cpu_bandwidth` measures what a CPU actually streams, STREAM style, with numpy in threads.
"""

from __future__ import annotations

import difflib
import logging
import os
import platform
import re
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

GIB = 1024**3
GB = 1e9


class Device(NamedTuple):
    name: str  # canonical name, e.g. "NVIDIA GeForce RTX 4090"
    vendor: str  # "nvidia", "amd", "apple" or "cpu": picks the page's efficiency
    memory_bytes: int  # device memory (Apple: largest unified-memory configuration)
    bandwidth_gb_s: float  # spec-sheet peak memory bandwidth, 1e9 bytes/s (CPU: measured)
    source: str  # where the numbers come from
    aliases: tuple[str, ...] = ()  # other names it goes by (NVML's, short forms); matched after normalizing
    hbm_stated: bool = False  # HBM where `source` does not print it (the NVL cards: the SXM part's memory)

    @property
    def hbm(self) -> bool:
        """Stacked high-bandwidth memory (HBM2/HBM2e/HBM3/HBM3e), as the spec source prints it. llama.cpp's
        batch-1 kernels reach a much smaller share of an HBM part's spec bandwidth than of a GDDR card's (the
        published A100 / H100 / MI300X rows), so the cross-device fit gives HBM parts terms of their own."""
        return self.hbm_stated or "hbm" in self.source.lower()

    def as_dict(self) -> dict:
        return {"name": self.name, "vendor": self.vendor, "memory_bytes": self.memory_bytes,
                "bandwidth_gb_s": self.bandwidth_gb_s, "hbm": self.hbm, "source": self.source}


_NV = "https://www.nvidia.com/en-us/"
_AMD = "https://www.amd.com/en/products/accelerators/instinct/"
_APPLE = "Apple newsroom / tech specs of the chip's launch"

CATALOG: tuple[Device, ...] = (
    # --- NVIDIA data center
    Device("NVIDIA H100 SXM", "nvidia", 80 * GIB, 3352, _NV + "data-center/h100/ (SXM5 80GB HBM3, 3.35 TB/s)",
           ("h100", "h100 sxm", "h100 sxm5", "h100 80gb hbm3", "h100 sxm5 80gb")),
    Device("NVIDIA H100 PCIe", "nvidia", 80 * GIB, 2039, _NV + "data-center/h100/ (PCIe 80GB HBM2e, 2.0 TB/s)",
           ("h100 pcie", "h100 80gb pcie")),
    Device("NVIDIA H100 NVL", "nvidia", 94 * GIB, 3938, _NV + "data-center/h100/ (NVL 94GB, 3.9 TB/s)",
           ("h100 nvl",), hbm_stated=True),
    Device("NVIDIA H200", "nvidia", 141 * GIB, 4800, _NV + "data-center/h200/ (141GB HBM3e, 4.8 TB/s)",
           ("h200", "h200 sxm", "h200 141gb hbm3e")),
    Device("NVIDIA H200 NVL", "nvidia", 141 * GIB, 4800, _NV + "data-center/h200/ (NVL, 4.8 TB/s)",
           ("h200 nvl",), hbm_stated=True),
    Device("NVIDIA A100 40GB", "nvidia", 40 * GIB, 1555, _NV + "data-center/a100/ (40GB HBM2, 1,555 GB/s)",
           ("a100 40gb", "a100 sxm4 40gb", "a100 pcie 40gb", "a100")),
    Device("NVIDIA A100 80GB", "nvidia", 80 * GIB, 2039, _NV + "data-center/a100/ (80GB SXM HBM2e, 2,039 GB/s)",
           ("a100 80gb", "a100 sxm4 80gb", "a100 80gb sxm")),
    Device("NVIDIA A100 80GB PCIe", "nvidia", 80 * GIB, 1935,
           _NV + "data-center/a100/ (80GB PCIe HBM2e, 1,935 GB/s)", ("a100 80gb pcie", "a100 pcie 80gb")),
    Device("NVIDIA A10G", "nvidia", 24 * GIB, 600, "AWS EC2 G5 (A10G 24GB GDDR6, 600 GB/s)", ("a10g",)),
    Device("NVIDIA A10", "nvidia", 24 * GIB, 600, _NV + "data-center/products/a10-gpu/ (24GB GDDR6, 600 GB/s)",
           ("a10",)),
    Device("NVIDIA L4", "nvidia", 24 * GIB, 300, _NV + "data-center/l4/ (24GB GDDR6, 300 GB/s)", ("l4",)),
    Device("NVIDIA L40S", "nvidia", 48 * GIB, 864, _NV + "data-center/l40s/ (48GB GDDR6, 864 GB/s)", ("l40s",)),
    Device("NVIDIA L40", "nvidia", 48 * GIB, 864, _NV + "data-center/l40/ (48GB GDDR6, 864 GB/s)", ("l40",)),
    Device("NVIDIA Tesla T4", "nvidia", 16 * GIB, 320, _NV + "data-center/tesla-t4/ (16GB GDDR6, 320 GB/s)",
           ("t4", "tesla t4")),
    Device("NVIDIA Tesla V100 32GB", "nvidia", 32 * GIB, 900, _NV + "data-center/v100/ (HBM2, 900 GB/s)",
           ("v100", "v100 sxm2 32gb", "v100 32gb", "v100 pcie 32gb")),
    # --- NVIDIA GeForce
    Device("NVIDIA GeForce RTX 3090", "nvidia", 24 * GIB, 936,
           _NV + "geforce/graphics-cards/30-series/rtx-3090-3090ti/ (24GB GDDR6X, 936 GB/s)", ("rtx 3090", "3090")),
    Device("NVIDIA GeForce RTX 3090 Ti", "nvidia", 24 * GIB, 1008,
           _NV + "geforce/graphics-cards/30-series/rtx-3090-3090ti/ (24GB GDDR6X 21 Gbps, 1,008 GB/s)",
           ("rtx 3090 ti", "3090 ti")),
    Device("NVIDIA GeForce RTX 4090", "nvidia", 24 * GIB, 1008,
           _NV + "geforce/graphics-cards/40-series/rtx-4090/ (24GB GDDR6X 21 Gbps, 1,008 GB/s)", ("rtx 4090", "4090")),
    Device("NVIDIA GeForce RTX 4080", "nvidia", 16 * GIB, 717,
           _NV + "geforce/graphics-cards/40-series/rtx-4080-family/ (16GB GDDR6X, 717 GB/s)", ("rtx 4080", "4080")),
    Device("NVIDIA GeForce RTX 5090", "nvidia", 32 * GIB, 1792,
           _NV + "geforce/graphics-cards/50-series/rtx-5090/ (32GB GDDR7 28 Gbps, 1,792 GB/s)", ("rtx 5090", "5090")),
    # --- transcribed with their sources in data/published/gpu-bandwidth.yaml (third-party spec tables: weaker
    # than a vendor's sheet, said so there); added for the published llama-bench rows of these GPUs
    Device("NVIDIA GeForce RTX 3060 12GB", "nvidia", 12 * GIB, 360,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (RTX 3060 12GB, 360)", ("rtx 3060", "rtx 3060 12gb")),
    Device("NVIDIA GeForce RTX 3070", "nvidia", 8 * GIB, 448,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (RTX 3070 8GB, 448)", ("rtx 3070",)),
    Device("NVIDIA GeForce RTX 3080", "nvidia", 10 * GIB, 760,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (RTX 3080 10GB, 760)", ("rtx 3080",)),
    Device("NVIDIA GeForce RTX 3080 Ti", "nvidia", 12 * GIB, 912,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (RTX 3080 Ti 12GB, 912)", ("rtx 3080 ti",)),
    Device("NVIDIA GeForce RTX 3070 Ti", "nvidia", 8 * GIB, 608,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (\"| RTX 3070 Ti 8GB | 6144 | 8 | 608 |\")",
           ("rtx 3070 ti",)),
    Device("NVIDIA GeForce RTX 4070 Ti", "nvidia", 12 * GIB, 504,
           "https://github.com/CYBIRD-D/How-to-Choose-your-LLM-Model-for-translation/blob/52379077acab0e1d450adb"
           "86345f9e705bb6cade/Nvidia_GPU_Specification.md (RTX 4070 Ti, 504)", ("rtx 4070 ti",)),
    Device("NVIDIA A40", "nvidia", 48 * GIB, 695.8,
           "https://gpu.spicedreamphone.com/en/gpu/a40-pcie-vs-geforce-rtx-3090 (A40 PCIe, 695.8 GB/s)",
           ("a40", "a40 pcie")),
    Device("NVIDIA RTX 6000 Ada Generation", "nvidia", 48 * GIB, 960,
           "https://www.grafikkarten.com/de/news/nvidia-rtx-6000-grafikkarte-der-ada-generation (384 Bit / 960 "
           "GByte/s)", ("rtx 6000 ada", "rtx 6000 ada generation")),
    Device("NVIDIA RTX A6000", "nvidia", 48 * GIB, 768,
           "https://notebookcheck.com/Ein-Leak-zeigt-ein-Bild-und-viele-Specs-der-Nvidia-Quadro-RTX-A-6000-mit-48-"
           "GB-GDDR6.495085.0.html (768 GB/s; a pre-launch leak, weak)", ("rtx a6000", "a6000")),
    Device("NVIDIA RTX A4000", "nvidia", 16 * GIB, 448,
           "https://www.ecer.com/corp/details-uuuedqa-p1bsb03-pci-express-3-0-x16-nvidia-rtx-a4000-16g-graphics-card-"
           "for-professional-video-editing.html (a copy of NVIDIA's spec sheet: \"Memory bandwidth 448 GB/s\"; 16G "
           "in the listing's name)", ("rtx a4000", "a4000")),
    # --- AMD Radeon
    Device("AMD Radeon RX 7900 XT", "amd", 20 * GIB, 800,
           "https://sezonuyakala.com/amd-radeon-rx-7900-xtx-and-7900-xt-graphics-cards-revealed/ (a pre-launch "
           "leak's table: \"Memory bandwidth 960 GB/s 800 GB/s\" for the XTX and XT, \"20 GB G6\"); "
           "https://www.hardwaredb.net/radeon-rx-7900-xt-benchmark prints \"20 GiB of GDDR6 memory, with a total "
           "memory bandwidth of 781 GB/s\" (781 = 800 / 1.024: GiB/s, it seems). No AMD page in the stored corpora",
           ("rx 7900 xt", "radeon rx 7900 xt")),
    Device("AMD Radeon RX 7900 XTX", "amd", 24 * GIB, 960,
           "https://sezonuyakala.com/amd-radeon-rx-7900-xtx-and-7900-xt-graphics-cards-revealed/ (a pre-launch "
           "leak's table: \"Memory bandwidth 960 GB/s 800 GB/s\" for the XTX and XT, \"24GB G6\"); "
           "https://pcspecchart.com/pc_parts/gpu/5: \"delivers a total memory bandwidth of 960 GB/s\". No AMD page "
           "in the stored corpora", ("rx 7900 xtx", "radeon rx 7900 xtx")),
    Device("AMD Radeon PRO W7900", "amd", 48 * GIB, 864,
           "https://www.itcreations.com/amd-gpu/amd-radeon-pro-w7900-gpu (a reseller: \"The bandwidth on this card "
           "delivers a blazing fast speed of 864 GB/s and a memory interface of 384-bit\"). No AMD page in the "
           "stored corpora", ("w7900", "radeon pro w7900", "pro w7900")),
    # --- AMD Instinct
    Device("AMD Instinct MI250X", "amd", 128 * GIB, 3277, _AMD + "mi200/mi250x.html (128GB HBM2e, 3.2768 TB/s)",
           ("mi250x",)),
    Device("AMD Instinct MI300X", "amd", 192 * GIB, 5300, _AMD + "mi300/mi300x.html (192GB HBM3, 5.3 TB/s)",
           ("mi300x",)),
    # --- Apple silicon (unified memory; the largest configuration)
    Device("Apple M1", "apple", 16 * GIB, 68.25, _APPLE + " (LPDDR4X-4266, 128-bit)", ("m1",)),
    Device("Apple M1 Pro", "apple", 32 * GIB, 200, _APPLE, ("m1 pro",)),
    Device("Apple M1 Max", "apple", 64 * GIB, 400, _APPLE, ("m1 max",)),
    Device("Apple M1 Ultra", "apple", 128 * GIB, 800, _APPLE, ("m1 ultra",)),
    Device("Apple M2", "apple", 24 * GIB, 100, _APPLE, ("m2",)),
    Device("Apple M2 Pro", "apple", 32 * GIB, 200, _APPLE, ("m2 pro",)),
    Device("Apple M2 Max", "apple", 96 * GIB, 400, _APPLE, ("m2 max",)),
    Device("Apple M2 Ultra", "apple", 192 * GIB, 800, _APPLE, ("m2 ultra",)),
    Device("Apple M3", "apple", 24 * GIB, 100, _APPLE, ("m3",)),
    Device("Apple M3 Pro", "apple", 36 * GIB, 150, _APPLE, ("m3 pro",)),
    Device("Apple M3 Max", "apple", 128 * GIB, 400, _APPLE + " (16-core CPU; the 14-core M3 Max has 300 GB/s)",
           ("m3 max",)),
    Device("Apple M3 Ultra", "apple", 512 * GIB, 819, _APPLE, ("m3 ultra",)),
    Device("Apple M4", "apple", 32 * GIB, 120, _APPLE, ("m4",)),
    Device("Apple M4 Pro", "apple", 64 * GIB, 273, _APPLE, ("m4 pro",)),
    Device("Apple M4 Max", "apple", 128 * GIB, 546, _APPLE + " (16-core CPU; the 14-core M4 Max has 410 GB/s)",
           ("m4 max",)),
)

# Words that say nothing about which device it is ("NVIDIA GeForce RTX 4090" = "rtx 4090").
_NOISE = {"nvidia", "geforce", "amd", "instinct", "tesla", "apple", "radeon", "gpu", "accelerator"}


_DESCRIPTIVE = re.compile(r"^(\d+gb|hbm\w*|gddr\w*|sxm\d*)$")


class UnknownDevice(ValueError):
    pass


def _tokens(name: str) -> list[str]:
    s = name.lower().replace("-", " ").replace("_", " ").replace("/", " ")
    s = re.sub(r"[^a-z0-9. ]", " ", s)
    return [t for t in s.split() if t not in _NOISE]


def _keys(d: Device) -> list[tuple[str, ...]]:
    return [tuple(_tokens(d.name)), *(tuple(_tokens(a)) for a in d.aliases)]


def lookup(name: str) -> Device:
    """The catalog entry for a device name: exact after normalizing (case, vendor words, dashes), else the
    entry with the most specific name all of whose words appear in `name` (NVML's "NVIDIA A100-SXM4-80GB"
    -> A100 80GB), else UnknownDevice with a "did you mean"."""
    toks = _tokens(name)
    if not toks:
        raise UnknownDevice(f"unknown device {name!r}")
    squashed = "".join(toks)
    for d in CATALOG:
        for k in _keys(d):
            if list(k) == toks or "".join(k) == squashed:
                return d
    # The most specific entry whose words are all in `name`, as long as the words left over only describe
    # (memory size and type, an unknown suffix), never name another variant ("M4 Ultra" is not the M4).
    vocab = {t for d in CATALOG for k in _keys(d) for t in k}
    have = set(toks)
    best: tuple[int, Device] | None = None
    for d in CATALOG:
        for k in _keys(d):
            extra = have - set(k)
            if (k and set(k) <= have and all(t not in vocab or _DESCRIPTIVE.match(t) for t in extra)
                    and (best is None or len(k) > best[0])):
                best = (len(k), d)
    if best is not None:
        return best[1]
    names = {" ".join(_tokens(d.name)): d.name for d in CATALOG}
    close = difflib.get_close_matches(" ".join(toks), list(names), n=1, cutoff=0.5)
    hint = f" (did you mean {names[close[0]]!r}?)" if close else ""
    raise UnknownDevice(f"unknown device {name!r}{hint}; known: {', '.join(d.name for d in CATALOG)}")


def cpuinfo_path() -> Path:
    """/proc/cpuinfo, or the file $HARNESS_CPUINFO names: the harness then takes that CPU's identity (its name, and
    harness.measure.fingerprint's fields) for this machine's. For testing the harness as another host; the kernels
    still run on the real one."""
    return Path(os.environ.get("HARNESS_CPUINFO") or "/proc/cpuinfo")


def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it (the name the harness's runs record and `--device cpu` means)."""
    try:
        for line in cpuinfo_path().read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find(name: str | None) -> Device | None:
    """lookup() that answers None for an unknown or missing name."""
    if not name:
        return None
    try:
        return lookup(name)
    except UnknownDevice:
        return None


def cpu_device(model: str, bandwidth_gb_s: float, memory_bytes: int, method: str) -> Device:
    """A CPU as a Device, with its measured bandwidth."""
    return Device(model or "CPU", "cpu", int(memory_bytes or 0), float(bandwidth_gb_s), f"measured: {method}")
