"""Entrypoint for Ray jobs: ``ray job submit --working-dir . -- python jobs/quantize.py ARGS``.

Takes exactly the arguments of ``nvfp4-ray quantize`` (including ``--config FILE.yaml``),
joins the cluster the job runs on, and exits 0 (done), 2 (bad input, nothing started) or
3 (failed while running; submit the same job again to resume). The last line of the job's
log is one JSON summary.
"""

import os
import sys

# `python jobs/quantize.py` puts jobs/ on sys.path; the package sits next to it in the
# uploaded working directory (Ray adds that directory to the workers' path itself).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvfp4_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
