"""The two ways a job ends badly, and the exit codes a scheduler acts on.

EXIT_OK (0): done.  EXIT_INPUT (2): bad input or configuration; re-running the same
command cannot help.  EXIT_RUN (3): failed while running (storage, workers, a bug);
re-running the same command resumes from the work already persisted.
"""

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_RUN = 3


class InputError(Exception):
    """Bad input: a one-line message naming the problem and, where there is one, the fix."""

    exit_code = EXIT_INPUT


class JobError(Exception):
    """The run failed for a reason other than its input; the same command resumes it."""

    exit_code = EXIT_RUN
