#!/usr/bin/env bash
# Set up (once) and run the whole test suite. The fixtures start SeaweedFS (S3) and
# fake-gcs-server (GCS) on free local ports, or use CKPTIO_TEST_S3_ENDPOINT /
# CKPTIO_TEST_GCS_ENDPOINT when set (see docker-compose.yml). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
exec .venv/bin/python -m pytest "$@"
