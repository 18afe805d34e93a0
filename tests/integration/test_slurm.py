"""The workflow on a real (one-node, localhost) SLURM cluster.

``scripts/slurm/start.sh`` installs Debian's slurmctld, slurmd and munge when
missing and starts them; this module runs the tiny config through
``--executor slurm --workflow-profile workflow/profiles/slurm`` in a temporary
working directory and checks that every non-local job went through SLURM, that
every output of the default target exists, and that a second run has nothing to
do. Teardown stops only the daemons that this module's start started.

Settings that only make sense for this test cluster are on the command line
(``LOCAL_CLUSTER_ARGS``), never in the profile: the cluster has no accounting
database, so job status comes from ``squeue`` (start.sh sets MinJobAge to an
hour, far above the plugin's threshold of 3 x the first status-check delay),
and no account is passed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts" / "slurm"
PROFILE = REPO_ROOT / "workflow" / "profiles" / "slurm"
TINY = REPO_ROOT / "config" / "tiny.yaml"

LOCAL_CLUSTER_ARGS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "5",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
)
RUN_TIMEOUT = 1800  # seconds; about 9 minutes on 2 busy cores, far less on an idle CI runner

RULE_HEADER = re.compile(r"^(local)?rule (\w+):$")
JOBID_LINE = re.compile(r"^\s+jobid: (\d+)$")
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$")


def parse_jobs(stdout: str) -> dict[int, tuple[str, bool]]:
    """Snakemake job id -> (rule name, is a local rule), from the rule blocks of a run's output."""
    jobs: dict[int, tuple[str, bool]] = {}
    header: tuple[str, bool] | None = None
    for line in stdout.splitlines():
        if match := RULE_HEADER.match(line):
            header = (match.group(2), match.group(1) is not None)
        elif header is not None and (match := JOBID_LINE.match(line)):
            jobs[int(match.group(1))] = header
            header = None
    return jobs


def parse_submissions(stdout: str) -> dict[int, tuple[str, Path]]:
    """Snakemake job id -> (SLURM job id, SLURM log path), from the executor's submission lines."""
    return {int(m.group(1)): (m.group(2), Path(m.group(3)))
            for m in map(SUBMITTED.match, stdout.splitlines()) if m}


def test_parsers_read_snakemake_output():
    stdout = "\n".join([
        "rule train:",
        "    input: results/tiny/manifest.parquet",
        "    jobid: 11",
        "Job 11 has been submitted with SLURM jobid 4 (log: /w/.snakemake/slurm_logs/rule_train/4.log).",
        "localrule all:",
        "    jobid: 0",
    ])
    assert parse_jobs(stdout) == {11: ("train", False), 0: ("all", True)}
    assert parse_submissions(stdout) == {11: ("4", Path("/w/.snakemake/slurm_logs/rule_train/4.log"))}


def _slurm_is_usable() -> str | None:
    """Why the local cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root (scripts/slurm/start.sh)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


@pytest.fixture(scope="module")
def local_slurm():
    """A running one-node SLURM; stops, afterwards, only the daemons started here."""
    reason = _slurm_is_usable()
    if reason:
        pytest.skip(reason)
    start = subprocess.run([str(SCRIPTS / "start.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=900)
    assert start.returncode == 0, f"scripts/slurm/start.sh failed:\n{start.stdout}"
    started = re.search(r"^STARTED=(.*)$", start.stdout, re.MULTILINE)
    assert started, f"scripts/slurm/start.sh printed no STARTED= line:\n{start.stdout}"
    names = [name for name in started.group(1).split(",") if name]
    yield names
    if names:
        subprocess.run([str(SCRIPTS / "stop.sh"), *names], check=True, timeout=120)


def squeue_states(slurm_ids: list[str]) -> dict[str, str]:
    """SLURM job id -> state, as slurmctld reports it (finished jobs stay listed for MinJobAge)."""
    result = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T", f"--jobs={','.join(slurm_ids)}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    return dict(line.split("|", 1) for line in result.stdout.split())


def summary_rows(run_snakemake, workdir: Path, configfile: Path) -> list[dict[str, str]]:
    """``snakemake --summary`` of the default target: one row per output file of the DAG."""
    result = run_snakemake("--configfile", configfile, "--summary", cwd=workdir)
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    header = lines[0].split("\t")
    assert header[:2] == ["output_file", "date"], result.stdout
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


@pytest.mark.slow
def test_tiny_config_runs_through_slurm_then_has_nothing_to_do(local_slurm, run_snakemake, tmp_path):
    # A snapshot of the tiny config: an edit to the repository's copy during the
    # run would otherwise make the second invocation rerun jobs.
    tiny = tmp_path / "tiny.yaml"
    shutil.copyfile(TINY, tiny)
    args = ("--workflow-profile", PROFILE, *LOCAL_CLUSTER_ARGS, "--configfile", tiny)

    first = run_snakemake(*args, cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert first.returncode == 0, first.stdout
    assert "Falling back to 'sacct'" not in first.stdout, "the plugin ignored --slurm-status-command squeue"

    # Every job of a non-local rule was submitted to SLURM, and SLURM ran it to completion.
    jobs = parse_jobs(first.stdout)
    submissions = parse_submissions(first.stdout)
    remote = {job for job, (_, local) in jobs.items() if not local}
    assert remote, first.stdout
    assert set(submissions) == remote, (
        f"jobs not submitted to SLURM: {sorted(jobs[j][0] for j in remote - set(submissions))}")
    slurm_ids = [slurm_id for slurm_id, _ in submissions.values()]
    assert len(set(slurm_ids)) == len(slurm_ids)
    states = squeue_states(slurm_ids)
    assert states == dict.fromkeys(slurm_ids, "COMPLETED"), states
    for job, (slurm_id, log) in submissions.items():
        text = log.read_text()  # kept by --slurm-keep-successful-logs
        assert f"rule {jobs[job][0]}:" in text, f"{log} does not show the {jobs[job][0]} rule running"
        assert "Finished jobid" in text, f"{log}: SLURM job {slurm_id} did not finish its rule"

    # Every output of the default target's DAG exists and is up to date.
    rows = summary_rows(run_snakemake, tmp_path, tiny)
    assert {row["rule"] for row in rows} <= {rule for rule, _ in jobs.values()}
    for row in rows:
        assert (tmp_path / row["output_file"]).is_file(), row
        assert (row["status"], row["plan"]) == ("ok", "no update"), row
    outputs = {row["output_file"] for row in rows}
    assert {"results/tiny/prompt_cam/evaluation.parquet", "results/tiny/intr/evaluation.parquet"} <= outputs

    second = run_snakemake(*args, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout
    assert "Nothing to be done" in second.stdout, second.stdout
    assert not parse_submissions(second.stdout), second.stdout
