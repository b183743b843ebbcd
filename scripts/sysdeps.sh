#!/usr/bin/env bash
# The system packages Tessera's demo and tests use. Checks the parts asked for and installs
# what is missing with apt-get when this user can (root, or sudo without a password);
# otherwise stops, before anything else runs, with the one command that installs them.
#
#   scripts/sysdeps.sh [cc] [mpi] [opencl]          no argument: all three
#
#   cc      a C compiler: Tessera compiles kernels at run time         build-essential
#   mpi     Open MPI: multi-rank tests, `tessera bench comm`,          openmpi-bin libopenmpi-dev
#           the MPI transport between machines, mpi4py
#   opencl  PoCL and the OpenCL ICD loader: the OpenCL backend         pocl-opencl-icd ocl-icd-opencl-dev
set -euo pipefail

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(cc mpi opencl)

have() { command -v "$1" >/dev/null 2>&1; }

# Fills `missing` (Debian package names) and `why` (one line per part) for the parts absent.
check() {
    missing=() why=()
    for part in "${parts[@]}"; do
        case $part in
        cc)
            have "${CC:-cc}" && continue
            missing+=(build-essential)
            why+=("  build-essential                    a C compiler (\$CC or cc): kernels compile at run time") ;;
        mpi)
            have mpirun && have mpicc && continue
            missing+=(openmpi-bin libopenmpi-dev)
            why+=("  openmpi-bin libopenmpi-dev         Open MPI: multi-rank tests and the MPI transport") ;;
        opencl)
            # an OpenCL device registered with the ICD loader (where the loader looks)
            compgen -G "${OCL_ICD_VENDORS:-/etc/OpenCL/vendors}/*.icd" >/dev/null &&
                [ -e /usr/include/CL/cl.h ] && continue
            missing+=(pocl-opencl-icd ocl-icd-opencl-dev)
            why+=("  pocl-opencl-icd ocl-icd-opencl-dev an OpenCL device (PoCL) and loader: the OpenCL backend") ;;
        *)
            echo "sysdeps: unknown part '$part' (known: cc mpi opencl)" >&2
            exit 2 ;;
        esac
    done
}

check
[ ${#missing[@]} -eq 0 ] && exit 0

install="apt-get install -y --no-install-recommends ${missing[*]}"
{
    echo "Tessera needs system packages that are not installed:"
    printf '%s\n' "${why[@]}"
} >&2
if ! have apt-get; then
    echo "This system has no apt-get: install the packages above under your distribution's" \
         "names (Fedora: gcc openmpi openmpi-devel pocl ocl-icd-devel), then run make again." >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif have sudo && sudo -n true 2>/dev/null; then
    sudo="sudo"
else
    echo "This user cannot install them (not root, no sudo without a password). Run:" >&2
    echo "  sudo apt-get update && sudo $install" >&2
    echo "then run make again." >&2
    exit 1
fi

echo "Installing: $install" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo $install -qq >/dev/null
check
if [ ${#missing[@]} -gt 0 ]; then
    echo "sysdeps: still missing after installing: ${missing[*]}" >&2
    exit 1
fi
