"""Ray Jobs entrypoint: personalize one subject on the cluster this job runs in.

    ray job submit -- python -m ray_jobs.personalize --config my-dog.yaml
    ray job submit -- python -m ray_jobs.personalize --model tiny --instance-dir ... --class-noun dog --output ...

Takes exactly the flags of ``dreambooth run``; Ray is joined through ``RAY_ADDRESS``, which the
job supervisor sets.
"""

import sys

from dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
