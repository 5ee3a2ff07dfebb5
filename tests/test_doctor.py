"""`qwen-edit doctor`'s diagnoses, each fed with made-up facts: no GPU, driver or Nunchaku needed."""

from __future__ import annotations

import pytest
import torch

from qwen_edit.hardware import DeviceInfo
from qwen_edit.nunchaku_backend import NunchakuStatus
from runners.cli.doctor import (
    TorchFacts,
    arch_supported,
    cuda_version_tuple,
    diagnose_gpu,
    diagnose_no_gpu,
    diagnose_nunchaku,
    diagnose_torch,
    parse_nvidia_smi,
)

GIB = 2**30
CUDA_TORCH = TorchFacts("2.9.0+cu128", "12.8", True, ("sm_80", "sm_86", "sm_90", "sm_100", "sm_120"), 1)
CPU_TORCH = TorchFacts("2.9.0+cpu", None)
SMI = {"gpus": [{"name": "NVIDIA GeForce RTX 5090", "driver": "570.86"}], "cuda_version": "12.8"}


def card(name: str, capability: tuple[int, int] | None) -> DeviceInfo:
    device = torch.device("cuda" if capability else "cpu")
    return DeviceInfo(device, name, capability, 32 * GIB if capability else None)


RTX_5090, RTX_4090, H100 = card("RTX 5090", (12, 0)), card("RTX 4090", (8, 9)), card("H100", (9, 0))
SPARK = card("DGX Spark", (12, 1))


@pytest.mark.parametrize(
    "capability, arch_list, supported",
    [
        ((12, 0), ["sm_80", "sm_90", "sm_120"], True),
        ((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], False),  # cu124 on a 5090
        ((8, 9), ["sm_80", "sm_86"], True),  # same major, lower minor: binary compatible
        ((8, 6), ["sm_89"], False),  # a newer minor never runs on an older one
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX of an older target is JIT-compiled
        ((8, 0), ["compute_90"], False),
        ((12, 1), ["sm_120a"], True),  # arch-specific suffixes
        ((8, 0), [], True),  # custom builds that list nothing get the benefit of the doubt
    ],
)
def test_arch_support(capability, arch_list, supported):
    assert arch_supported(capability, arch_list) is supported


def test_versions_and_nvidia_smi_output_are_parsed():
    assert cuda_version_tuple("12.8") == (12, 8) and cuda_version_tuple("12.4.1") == (12, 4)
    assert cuda_version_tuple("12.10") > cuda_version_tuple("12.8")  # numbers, not text
    query = (
        "NVIDIA GeForce RTX 5090, 570.86.10, 32607, 1200, 31407\n"
        "NVIDIA A100-SXM4-80GB, 570.86.10, 81920, [N/A], 81000\n"
    )
    header = "| NVIDIA-SMI 570.86.10   Driver Version: 570.86.10   CUDA Version: 12.8     |"
    smi = parse_nvidia_smi(query, header)
    assert smi["cuda_version"] == "12.8" and "error" not in smi
    assert smi["gpus"][0] == {
        "name": "NVIDIA GeForce RTX 5090", "driver": "570.86.10",
        "memory_total_mib": 32607, "memory_used_mib": 1200, "memory_free_mib": 31407,
    }  # fmt: skip
    assert smi["gpus"][1]["memory_used_mib"] is None  # "[N/A]" on some cards
    failed = parse_nvidia_smi("", "", returncode=9, stderr="NVIDIA-SMI has failed because it couldn't "
                              "communicate with the NVIDIA driver.")  # fmt: skip
    assert failed["gpus"] == [] and "couldn't communicate" in failed["error"] and "cuda_version" not in failed


def test_torch_builds():
    assert diagnose_torch(CUDA_TORCH, SMI).status == "ok"
    assert diagnose_torch(CPU_TORCH, {}).status == "info"
    wrong = diagnose_torch(CPU_TORCH, SMI)  # a CPU build on a GPU machine
    assert wrong.status == "error" and "RTX 5090" in wrong.summary
    assert "--index-url https://download.pytorch.org/whl/cu128" in wrong.fix and "CUDA 12.8" in wrong.fix


@pytest.mark.parametrize(
    "torch_facts, smi, visible, words",
    [
        (CPU_TORCH, {}, None, "CPU-only build and there is no NVIDIA driver"),
        (CPU_TORCH, SMI, None, "invisible to torch: it is a CPU-only build"),
        (CUDA_TORCH, SMI, "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
        (CUDA_TORCH, SMI, "-1", "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
        (CUDA_TORCH, {}, None, "built for CUDA 12.8 but there is no NVIDIA driver"),
        (
            CUDA_TORCH,
            {**SMI, "cuda_version": "12.4"},
            None,
            "the driver supports CUDA 12.4, torch needs 12.8",
        ),
        (
            CUDA_TORCH,
            {**SMI, "error": "GPU is lost"},
            "0",
            "nvidia-smi works but torch sees no GPU (GPU is lost)",
        ),
    ],
)
def test_why_torch_sees_no_gpu(torch_facts, smi, visible, words):
    check = diagnose_no_gpu(torch_facts, smi, visible)
    assert check.status == "error" and words in check.summary and check.fix
    assert check.details["CUDA_VISIBLE_DEVICES"] == visible


def test_a_gpu_torch_sees():
    ok = diagnose_gpu(RTX_5090, CUDA_TORCH, SMI, free=30 * GIB, total=32 * GIB)
    assert ok.status == "ok" and "RTX 5090 (SM 120), 32.0 GiB, 30.0 GiB free; driver 570.86" in ok.summary
    busy = diagnose_gpu(RTX_5090, CUDA_TORCH, SMI, free=8 * GIB, total=32 * GIB)
    assert busy.status == "warn" and "other processes hold 24.0 GiB" in busy.summary
    old_torch = TorchFacts("2.5.1+cu124", "12.4", True, ("sm_80", "sm_86", "sm_90"), 1)
    no_kernels = diagnose_gpu(RTX_5090, old_torch, SMI, free=30 * GIB, total=32 * GIB)
    assert no_kernels.status == "error" and "has no kernels for SM 120" in no_kernels.summary
    assert "CUDA 12.8 or newer" in no_kernels.fix


def test_nunchaku_missing_broken_impostor_mismatched_too_old_and_fine():
    missing = NunchakuStatus("missing")
    assert diagnose_nunchaku(missing, H100, "2.9.0", "3.12.3").status == "info"  # no kernels: not needed
    assert diagnose_nunchaku(missing, None, "2.9.0", "3.12.3").status == "info"
    wanted = diagnose_nunchaku(missing, RTX_4090, "2.9.0+cu128", "3.12.3")
    assert wanted.status == "warn" and "int4 kernels" in wanted.summary
    assert "torch 2.9.0 and Python 3.12.3" in wanted.fix
    impostor = diagnose_nunchaku(NunchakuStatus("impostor", "0.16.1"), RTX_5090, "2.9.0", "3.12.3")
    assert impostor.status == "error" and "pip uninstall -y nunchaku" in impostor.fix
    broken = diagnose_nunchaku(
        NunchakuStatus("broken", "1.0.2+torch2.8", "ImportError: undefined symbol"),
        RTX_5090,
        "2.9.0",
        "3.12.3",
    )
    assert broken.status == "error" and "undefined symbol" in broken.fix
    other_torch = diagnose_nunchaku(NunchakuStatus("ok", "1.0.2+torch2.8"), RTX_5090, "2.9.0+cu128", "3.12.3")
    assert other_torch.status == "error" and "built for torch 2.8, not 2.9" in other_torch.summary
    too_old = diagnose_nunchaku(NunchakuStatus("ok", "1.0.2+torch2.9"), SPARK, "2.9.0", "3.12.3")
    assert too_old.status == "error" and "1.1" in too_old.fix
    fine = diagnose_nunchaku(NunchakuStatus("ok", "1.0.2+torch2.9"), RTX_5090, "2.9.0+cu128", "3.12.3")
    assert fine.status == "ok" and "used for fp4 files" in fine.summary
    unused = diagnose_nunchaku(NunchakuStatus("ok", "1.0.2+torch2.9"), H100, "2.9.0", "3.12.3")
    assert unused.status == "ok" and "installed but unused" in unused.summary
