"""`fdkeeper run`: test files (YAML) with sipp steps through a keeper of their own.

Modules, one concern each:
- model: the test file, read and checked (load_test, TestSpec, Step, TestFileError);
- sutspec: what `sut:` describes (embedded, an address, a Kamailio configuration, a command);
- variables: ${name} substitution and ${free_port:LABEL};
- sut: the test's SuT started, waited for and stopped (or the address it names);
- steps: one step as a process, its logs and verdict (StepRun);
- scheduler: starting steps when `after`/`started`/`ready`/`wait` allow;
- interrupt: cancelling a run (SIGTERM/SIGHUP/SIGINT), the request the scheduler answers;
- testcase: one test from start to end (run_test);
- results: the verdicts of steps and tests and their statuses (StepResult, TestResult);
- cause: why a failed step failed, from its logs (step_cause);
- logs: the log folder per run with `latest`;
- console: the live lines and the summary;
- junit: the JUnit XML report, a testcase per step;
- ladder: one test's SIP messages in time order with their kept connections and the keeper's events;
- html: the HTML report (--html): steps, sipp's statistics, the ladder drawn;
- shard: --shard K/N, the files of one shard;
- command: the click command `run_command` (load_tests, run_tests).
"""
