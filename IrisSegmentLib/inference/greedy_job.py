"""Runs one registration job with Greedy (picsl-greedy) in a child process; standalone (no torch, no package import).

    python greedy_job.py JOB_DIR

JOB_DIR/job.json: {"threads", "commands": [greedy command lines, file names relative to JOB_DIR]}. Each command
is printed as "stage i/n" on stdout when it starts and "done" at the end; a Greedy error is printed as
"error: ..." with exit code 1. The parent process kills this one to cancel (`localise.py`)."""
import json
import os
import sys


def main(folder: str) -> int:
    job = json.load(open(os.path.join(folder, "job.json")))
    os.chdir(folder)
    try:
        from picsl_greedy import Greedy3D
    except ImportError as e:
        print(f"error: {e}", flush=True)
        return 1
    g = Greedy3D()
    for i, command in enumerate(job["commands"]):
        print(f"stage {i + 1}/{len(job['commands'])}", flush=True)
        try:
            g.execute(f"-d 3 -V 0 -threads {job['threads']} {command}")
        except RuntimeError as e:
            print(f"error: {' '.join(str(e).split())}", flush=True)
            return 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
