#!/usr/bin/env bash
# Create .venv and install AnyDoor Serve into it. `--test` adds the test tools.
#
# torch is installed first, and its build is chosen on purpose: a bare `torch` requirement takes whatever the
# index's default Linux wheel is (on PyPI the CUDA build, several GB of nvidia-* packages), GPU or not.
#   - a host with an NVIDIA GPU (nvidia-smi works, or /proc/driver/nvidia exists) gets the CUDA build from torch's
#     own index, for CUDA_VERSION below: the CUDA version of the Dockerfile's base image and of cog.yaml;
#   - any other host gets the CPU build, from torch's CPU index.
# Where torch's index cannot be reached (a mirror or proxy that only serves PyPI), the same version comes from the
# default index instead, and the script says so. Either way it prints the build it got.
#
#   ANYDOOR_TORCH=cpu|cuda|auto   force the build (default auto: detect the GPU). The Docker build has no GPU to
#                                 detect and passes cuda.
#   TORCH_SPEC="..."              install exactly these pip arguments instead (e.g. "torch==2.13.0 --index-url
#                                 <another of torch's indexes>"); the choice above is skipped, the report is not.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
# The one CUDA version of the project: Dockerfile BASE_IMAGE, cog.yaml build.cuda, the README
# (tests/test_deploy_manifests.py checks that they agree).
CUDA_VERSION="12.8"
TORCH_INDEX="https://download.pytorch.org/whl"
CUDA_INDEX="${TORCH_INDEX}/cu${CUDA_VERSION//./}"
CPU_INDEX="${TORCH_INDEX}/cpu"

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

say() { echo "setup.sh: $*"; }
warn() { echo "setup.sh: WARNING: $*" >&2; }

has_nvidia_gpu() {
    { command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1; } || [ -d /proc/driver/nvidia ]
}

gpu=no
has_nvidia_gpu && gpu=yes
want="${ANYDOOR_TORCH:-auto}"
case "$want" in
    auto) if [ "$gpu" = yes ]; then want=cuda; else want=cpu; fi ;;
    cpu | cuda) ;;
    *) echo "setup.sh: error: ANYDOOR_TORCH=$want: expected cpu, cuda or auto" >&2; exit 2 ;;
esac

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

# Whether a package index answers at all, within seconds (pip would retry an unreachable one for minutes). Any
# HTTP answer counts: if the index then fails to serve torch, the install below fails and falls back as well.
reachable() {
    python - "$1/torch/" << 'EOF' > /dev/null 2>&1
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=8).close()
except urllib.error.HTTPError:
    pass
EOF
}

if [ -n "${TORCH_SPEC:-}" ]; then
    say "torch: TORCH_SPEC override: pip install ${TORCH_SPEC}"
    # shellcheck disable=SC2086
    python -m pip install --quiet ${TORCH_SPEC}
else
    if [ "$want" = cuda ]; then index="$CUDA_INDEX"; build="CUDA ${CUDA_VERSION}"; else index="$CPU_INDEX"; build="CPU"; fi
    say "torch ${TORCH_VERSION}: NVIDIA GPU detected: ${gpu}; ANYDOOR_TORCH=${ANYDOOR_TORCH:-auto}: the ${build} build"
    # On Linux torch's indexes tag the build in the version (2.13.0+cu128, 2.13.0+cpu): pinning the tag makes pip
    # replace an installed build of the same version that is the wrong one, which a bare ==2.13.0 would keep.
    pin="torch==${TORCH_VERSION}"
    [ "$(uname -s)" = Linux ] && pin="${pin}+${index##*/}"
    # torch's dependencies (filelock, sympy, ...) are on that index too; the project's own come from the default.
    if ! reachable "$index"; then
        problem="${index} is not reachable"
    elif ! python -m pip install --quiet --timeout 30 "$pin" --index-url "$index"; then
        problem="installing from ${index} failed"
    else
        problem=""
        say "torch: installed from ${index}"
    fi
    if [ -n "$problem" ]; then
        warn "${problem}: installing torch==${TORCH_VERSION} from the default package index instead; its build is" \
             "whatever that index serves for this platform (see below)"
        python -m pip install --quiet "torch==${TORCH_VERSION}"
    fi
fi
python -m pip install --quiet -e ".${extras}"

# Say what was really installed, and whether it can use the GPU it is meant for.
torch_cuda="$(python -c "import torch; print(torch.version.cuda or '')")"
say "installed: torch $(python -c "import torch; print(torch.__version__)"), torch.version.cuda=${torch_cuda:-None}" \
    "($([ -n "$torch_cuda" ] && echo "CUDA ${torch_cuda} build" || echo "CPU build"))"
if [ -n "${TORCH_SPEC:-}" ] && [ "$gpu" = no ] && [ "${ANYDOOR_TORCH:-auto}" = auto ]; then
    want=any  # an override, on a host without a GPU, with no build asked for: nothing to check it against
fi
if [ "$want" = cuda ] && [ -z "$torch_cuda" ]; then
    warn "************************************************************************************************"
    warn "this is a CPU build of torch, but the CUDA ${CUDA_VERSION} build was wanted (NVIDIA GPU detected: ${gpu}):"
    warn "everything would run on the CPU. Make ${CUDA_INDEX} reachable, or set TORCH_SPEC to a CUDA wheel."
    warn "************************************************************************************************"
    # Asked for explicitly (the Docker build): an image without CUDA is a broken image, so stop here.
    if [ "${ANYDOOR_TORCH:-auto}" = cuda ] && [ -z "${TORCH_SPEC:-}" ]; then exit 1; fi
elif [ "$want" = cuda ] && [ "$torch_cuda" != "$CUDA_VERSION" ]; then
    warn "torch is built for CUDA ${torch_cuda}, not ${CUDA_VERSION} (the base image's and cog.yaml's); its wheels" \
         "bundle their own CUDA libraries, so it works where the driver supports CUDA ${torch_cuda}"
elif [ "$want" = cpu ] && [ -n "$torch_cuda" ]; then
    warn "this is the CUDA ${torch_cuda} build of torch on a host without an NVIDIA GPU: it runs on the CPU, with" \
         "several GB of unused CUDA libraries (the default index's build; with ${CPU_INDEX} reachable you get the CPU" \
         "build)"
fi
if [ "$gpu" = yes ] && [ -n "$torch_cuda" ]; then
    if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        say "torch sees the GPU: $(python -c "import torch; print(torch.cuda.get_device_name(0))")"
    else
        warn "torch cannot use the GPU (torch.cuda.is_available() is False): is the NVIDIA driver recent enough" \
             "for CUDA ${torch_cuda}? (nvidia-smi shows the CUDA version the driver supports)"
    fi
fi
python -c "import model, service"
say "ready: .venv/bin/anydoor --help"
