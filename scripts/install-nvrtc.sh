#!/usr/bin/env bash
# Installs NVRTC and the CUDA headers from PyPI into a virtual environment, so that the
# compile-only test tier (tests/compile_kernels.rs, tests/jit_nvrtc.rs) runs on a machine without
# a CUDA toolkit or GPU. flashinfer's discovery finds the wheels through $VIRTUAL_ENV.
#
# What the pinned CUDA 13 wheels contain (checked with `pip download --no-deps`):
#   nvidia-cuda-nvrtc   13.0.88 -> site-packages/nvidia/cu13/lib/libnvrtc.so.13,
#                                  nvidia/cu13/lib/libnvrtc-builtins.so.13.0, nvidia/cu13/include/nvrtc.h
#   nvidia-cuda-runtime 13.0.96 -> site-packages/nvidia/cu13/include/{cuda_fp16.h,cuda_bf16.h,
#                                  cuda_runtime.h,...}, nvidia/cu13/lib/libcudart.so.13
#
# Usage:
#   source scripts/install-nvrtc.sh                  # install, and export into this shell
#   eval "$(bash scripts/install-nvrtc.sh)"          # the same from a script
#   bash scripts/install-nvrtc.sh                    # install; prints the export lines on stdout
# Then: cargo test -p flashinfer --test compile_kernels --test jit_nvrtc
#
# Environment: VENV_DIR (default <repo>/.venv-ci), PYTHON (default python3).
# Exports VIRTUAL_ENV (where discovery looks) and FLASHINFER_REQUIRE_NVRTC=1 (so the NVRTC tests
# fail rather than skip if discovery still cannot find it).

_fi_install_nvrtc() {
    local repo_root venv python site
    local nvrtc_pin="nvidia-cuda-nvrtc==13.0.88"
    local runtime_pin="nvidia-cuda-runtime==13.0.96"
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="${VENV_DIR:-$repo_root/.venv-ci}"
    python="${PYTHON:-python3}"

    if [ ! -x "$venv/bin/python" ]; then
        echo "install-nvrtc: creating virtual environment $venv" >&2
        "$python" -m venv "$venv" >&2 || return 1
    fi
    # pip would be a no-op for wheels already there, but still costs a resolver round trip.
    local installed
    installed="$("$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null || true)"
    if grep -qx "$nvrtc_pin" <<<"$installed" && grep -qx "$runtime_pin" <<<"$installed"; then
        echo "install-nvrtc: $nvrtc_pin and $runtime_pin already in $venv" >&2
    else
        echo "install-nvrtc: installing $nvrtc_pin $runtime_pin into $venv" >&2
        "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-deps \
            "$nvrtc_pin" "$runtime_pin" >&2 || return 1
    fi

    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    if [ ! -f "$site/nvidia/cu13/lib/libnvrtc.so.13" ] || [ ! -f "$site/nvidia/cu13/include/cuda_fp16.h" ]; then
        echo "install-nvrtc: error: the wheels did not install $site/nvidia/cu13/{lib/libnvrtc.so.13,include/cuda_fp16.h}" >&2
        return 1
    fi
    echo "install-nvrtc: NVRTC at $site/nvidia/cu13/lib/libnvrtc.so.13" >&2
    echo "install-nvrtc: CUDA headers at $site/nvidia/cu13/include" >&2
    _FI_VENV="$venv"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: export into the caller's shell, leaving its options (set -e, ...) alone.
    if _fi_install_nvrtc; then
        export VIRTUAL_ENV="$_FI_VENV"
        export FLASHINFER_REQUIRE_NVRTC=1
        echo "install-nvrtc: exported VIRTUAL_ENV=$VIRTUAL_ENV FLASHINFER_REQUIRE_NVRTC=1" >&2
    else
        echo "install-nvrtc: failed" >&2
    fi
    unset _FI_VENV
    unset -f _fi_install_nvrtc
else
    set -euo pipefail
    _fi_install_nvrtc
    printf 'export VIRTUAL_ENV=%q\nexport FLASHINFER_REQUIRE_NVRTC=1\n' "$_FI_VENV"
fi
