"""`fdkeeper run`: test files (YAML) with sipp steps through a keeper of their own.

Modules, one concern each:
- model: the test file, read and checked (load_test, TestSpec, Step, TestFileError);
- variables: ${name} substitution and ${free_port:LABEL};
- sut: the embedded Kamailio SuT of a test, or the address it names;
- steps: one step as a process, its logs and verdict (StepRun);
- scheduler: starting steps when `after`/`started`/`ready`/`wait` allow;
- testcase: one test from start to end (run_test);
- results: the verdicts of steps and tests and their statuses (StepResult, TestResult);
- logs: the log folder per run with `latest`;
- console: the live lines and the summary;
- junit: the JUnit XML report;
- command: the click command `run_command` (load_tests, run_tests).
"""
