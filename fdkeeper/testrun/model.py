"""The test file (YAML): what a test is, read and checked before anything runs.

    name: register-answer-tcp        # default: the file's name without .yaml
    sut: embedded                    # or HOST:PORT, or {embedded: {auth, users}}, {kamailio: FILE},
                                     # {command: ..., ready: tcp:PORT}: see sutspec; absent: no SuT
    transport: tcp                   # embedded SuT: tcp, tls, ws or wss (see testrun.transport)
    xfail: "why it fails today"      # optional: a failure is expected, not counted
    vars: {users: "${here}/users.csv"}
    steps:
      - name: register
        sipp: -sf ${scenarios}/uac-register.xml -inf ${users} -t t1 -i 127.0.0.1 -m 1 ${sut}
        options: [--tls-ca, "${tls_ca}"]      # fdkeeper sipp's own options (sipp steps)
        after: STEP | [STEP...]     # start once those steps finished
        started: STEP | [STEP...]   # ... once their process started
        ready: STEP | [STEP...]     # ... once their server sipp is ready to receive
        wait: 0.5                   # extra seconds after the above
        timeout: 60                 # seconds; then the step is killed and fails
        expect: {exit: 0, successful: 1, failed: 0}
      - name: list
        command: fdkeeper status --dir ${keeper_dir}

A bad file is one line naming the file, the step and the field (``TestFileError``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdkeeper.address import split_host_port
from fdkeeper.errors import FdkeeperError
from fdkeeper.testrun import transport, variables
from fdkeeper.testrun.sutspec import (
    DEFAULT_READY_TIMEOUT,
    STARTED_SUT_VARIABLES,
    AddressSut,
    EmbeddedSut,
    Readiness,
    StartedSut,
    SutSpec,
)

DEFAULT_TIMEOUT = 60.0
ORDERINGS = ("after", "started", "ready")
STEP_FIELDS = {"name", "sipp", "command", "options", "wait", "timeout", "expect", *ORDERINGS}
TEST_FIELDS = {"name", "description", "sut", "transport", "xfail", "vars", "steps"}
EXPECT_FIELDS = {"exit", "successful", "failed"}
MAX_FILE_BYTES = 1024 * 1024  # a test file is a page of YAML; anything far larger is a mistake
MAX_SECONDS = 86400.0  # a day: a wait or timeout beyond it is a typo, not a test
MAX_NAME_BYTES = 200  # names become log file names (plus suffixes), which the file system caps at 255 bytes
_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TestFileError(FdkeeperError):
    """A test file that cannot run; its message is the one line to print."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class Expect:
    exit: int = 0
    successful: int | None = None
    failed: int | None = None


@dataclass
class Step:
    name: str
    kind: str  # "sipp" or "command"
    args: list[str]  # tokens, ${name}s not yet replaced
    options: list[str] = field(default_factory=list)
    after: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    ready: tuple[str, ...] = ()
    wait: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    expect: Expect = Expect()

    def waits_for(self) -> set[str]:
        return {*self.after, *self.started, *self.ready}


@dataclass
class TestSpec:
    path: Path
    name: str
    steps: list[Step]
    sut: SutSpec | None = None  # see sutspec: embedded, an address, or one the runner starts
    transport: str = "tcp"
    vars: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None
    description: str = ""

    __test__ = False

    def known_variables(self) -> set[str]:
        known = set(variables.BUILTIN) | set(self.vars)
        if self.sut:
            known |= set(variables.SUT_VARIABLES)
        if isinstance(self.sut, EmbeddedSut):
            known |= set(transport.VARIABLES[self.transport])
        return known


class _Where:
    """Builds the one-line error for a place in a file."""

    def __init__(self, path: Path, step: str | None = None) -> None:
        self.path = path
        self.step = step if step is None or len(step) <= 60 else f"{step[:40]}..."  # the line stays readable

    def error(self, field_name: str | None, text: str) -> TestFileError:
        parts = [f"fdkeeper: {self.path}"]
        if self.step is not None:
            parts.append(f"step '{self.step}'")
        if field_name is not None:
            parts.append(f"field '{field_name}'")
        return TestFileError(": ".join([*parts, text]))


def load_test(path: Path) -> TestSpec:
    """Read and check one test file; raise TestFileError (one line) when it is bad."""
    path = Path(path)
    where = _Where(path)
    document = _read_yaml(path, where)
    if not isinstance(document, dict):
        raise where.error(None, f"expected a mapping with 'steps', got {_kind(document)}")
    _no_unknown(document, TEST_FIELDS, where)
    spec = TestSpec(
        path=path,
        name=_name(document.get("name", path.stem), "name", where),
        steps=[],
        sut=_sut(document.get("sut"), path.parent, where),
        transport=_choice(document.get("transport", "tcp"), transport.TRANSPORTS, "transport", where),
        vars=_vars(document.get("vars") or {}, where),
        xfail=_optional_text(document.get("xfail"), "xfail", where),
        description=_optional_text(document.get("description"), "description", where) or "",
    )
    if spec.transport != "tcp" and not isinstance(spec.sut, EmbeddedSut):
        raise where.error(
            "transport",
            f"only an embedded SuT ('sut: embedded') is started with {spec.transport.upper()}; for your own SuT "
            "pass --tls-* (and --ws) in the steps' options",
        )
    spec.steps = _steps(document.get("steps"), where)
    _websocket_steps(spec, where)
    _check_variables(spec, where)
    return spec


def _read_yaml(path: Path, where: _Where) -> Any:
    try:
        import yaml  # here: the pytest plugin imports this module, and must load without PyYAML
    except ImportError:
        raise where.error(
            None, "reading test files needs PyYAML, which is not installed (pip install pyyaml)"
        ) from None
    text = _read_text(path, where)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise where.error(None, f"{line}not valid YAML: {problem}") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        raise where.error(None, "not valid as a test file: it nests lists or mappings too deeply") from None


def _read_text(path: Path, where: _Where) -> str:
    """The file as UTF-8 text, refused (one line) when it is too large or not UTF-8."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise where.error(None, f"cannot read it: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise where.error(
            None, f"larger than {MAX_FILE_BYTES // 1024} KiB: a test file is a page of YAML; is it the right file?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise where.error(
            None, f"line {line}: not UTF-8 (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _steps(raw: Any, where: _Where) -> list[Step]:
    if isinstance(raw, list) and not raw:
        raise where.error("steps", "no steps: a test needs at least one step")
    if not isinstance(raw, list):
        raise where.error("steps", f"expected a list of steps, got {_kind(raw)}")
    steps: list[Step] = []
    for index, item in enumerate(raw, 1):
        name = item.get("name") if isinstance(item, dict) else None
        step_where = _Where(where.path, str(name) if name is not None else f"#{index}")
        if not isinstance(item, dict):
            raise step_where.error(None, f"expected a mapping, got {_kind(item)}")
        steps.append(_step(item, step_where))
    _check_orderings(steps, where)
    return steps


def _step(item: dict[str, Any], where: _Where) -> Step:
    _no_unknown(item, STEP_FIELDS, where)
    name = _name(item.get("name"), "name", where)
    if not _STEP_NAME.match(name):
        raise where.error("name", f"expected letters, digits, '.', '_' or '-' (it names log files), got {name!r}")
    kinds = [kind for kind in ("sipp", "command") if kind in item]
    if len(kinds) != 1:
        raise where.error("sipp", "expected exactly one of 'sipp' (sipp's arguments) or 'command' (any command)")
    kind = kinds[0]
    if "options" in item and kind != "sipp":
        raise where.error("options", "only a 'sipp' step takes fdkeeper sipp options")
    step = Step(
        name=name,
        kind=kind,
        args=_tokens(item[kind], kind, where),
        options=_tokens(item.get("options", []), "options", where, allow_empty=True),
        wait=_seconds(item.get("wait", 0), "wait", where, allow_zero=True),
        timeout=_seconds(item.get("timeout", DEFAULT_TIMEOUT), "timeout", where),
        expect=_expect(item.get("expect", {}), kind, where),
        **{ordering: _names(item.get(ordering), ordering, where) for ordering in ORDERINGS},
    )
    return step


def _websocket_steps(spec: TestSpec, where: _Where) -> None:
    """A WebSocket test's stream sipp steps run `fdkeeper sipp --ws` (testrun.transport)."""
    for step in spec.steps:
        if step.kind == "sipp":
            try:
                step.options = transport.step_options(spec.transport, step.args, step.options)
            except ValueError as error:
                raise _Where(where.path, step.name).error("sipp", str(error)) from None


def _check_orderings(steps: list[Step], where: _Where) -> None:
    by_name: dict[str, Step] = {}
    for step in steps:
        if step.name in by_name:
            raise _Where(where.path, step.name).error("name", "two steps have this name")
        by_name[step.name] = step
    for step in steps:
        step_where = _Where(where.path, step.name)
        for ordering in ORDERINGS:
            for other in getattr(step, ordering):
                if other == step.name:
                    raise step_where.error(ordering, "a step cannot wait for itself")
                if other not in by_name:
                    raise step_where.error(ordering, f"no step named '{other}' (steps: {', '.join(by_name)})")
                if ordering == "ready" and by_name[other].kind != "sipp":
                    raise step_where.error(
                        ordering, f"'{other}' is a command; only a sipp step can be ready to receive"
                    )
    _refuse_cycles(by_name, where)


def _refuse_cycles(by_name: dict[str, Step], where: _Where) -> None:
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise _Where(where.path, name).error("after", f"the steps wait for each other: {cycle}")
        state[name] = "visiting"
        for other in sorted(by_name[name].waits_for()):
            visit(other, [*chain, name])
        state[name] = "done"

    for name in by_name:
        visit(name, [])


def _check_variables(spec: TestSpec, where: _Where) -> None:
    known = set(variables.BUILTIN) | (spec.known_variables() - set(spec.vars))
    for name, text in spec.vars.items():  # a var may use builtins and earlier vars
        _known(text, known, where, f"vars.{name}")
        known.add(name)
    for step in spec.steps:
        step_where = _Where(where.path, step.name)
        for field_name, tokens in ((step.kind, step.args), ("options", step.options)):
            for token in tokens:
                _known(token, known, step_where, field_name)


def _known(text: str, known: set[str], where: _Where, field_name: str) -> None:
    try:
        variables.check_known(text, known)
    except variables.UnknownVariable as error:
        raise where.error(field_name, str(error)) from None


# ------------------------------------------------------------------ field readers


def _kind(value: Any) -> str:
    return {type(None): "nothing", dict: "a mapping", list: "a list", str: f"{value!r}"}.get(type(value), f"'{value}'")


def _no_unknown(item: dict[str, Any], allowed: set[str], where: _Where, prefix: str = "") -> None:
    for key in item:
        if key not in allowed:
            raise where.error(f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(allowed))})")


def _text(value: Any, field_name: str, where: _Where) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise where.error(field_name, f"expected text, got {_kind(value)}")
    return str(value)


def _name(value: Any, field_name: str, where: _Where) -> str:
    """A test's or step's name: text short enough to name its log files."""
    name = _text(value, field_name, where)
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise where.error(
            field_name,
            f"{size} bytes long ({name[:20]!r}...); at most {MAX_NAME_BYTES}, as it names log files: shorten it",
        )
    return name


def _optional_text(value: Any, field_name: str, where: _Where) -> str | None:
    return None if value is None else _text(value, field_name, where)


def _choice(value: Any, choices: tuple[str, ...], field_name: str, where: _Where) -> str:
    if not isinstance(value, str) or value not in choices:
        raise where.error(field_name, f"expected {' or '.join(choices)}, got {_kind(value)}")
    return value


# ------------------------------------------------------------------ sut (see sutspec)

_SUT_FORMS = ("embedded", "kamailio", "command", "address")
_SUT_FIELDS = {
    "embedded": {"embedded"},
    "address": {"address", "domain"},
    "kamailio": {"kamailio", "address", "domain", "timeout"},
    "command": {"command", "ready", "address", "domain", "timeout"},
}
_READY = re.compile(r"^\s*(tcp|log)\s*:\s*(.+?)\s*$", re.DOTALL)


def _sut(value: Any, here: Path, where: _Where) -> SutSpec | None:
    """The `sut:` field (None: no SuT); `here` is the test file's folder, which paths are relative to."""
    if value is None:
        return None
    if value == "embedded":
        return EmbeddedSut()
    if not isinstance(value, dict):
        return AddressSut(_address(value, "sut", where))
    forms = [form for form in _SUT_FORMS if form in value]
    if "address" in forms and len(forms) == 2:
        forms.remove("address")  # a started SuT may name the address it listens on
    if len(forms) != 1:
        raise where.error("sut", f"expected one of {', '.join(_SUT_FORMS)} (or 'embedded', or HOST:PORT)")
    form = forms[0]
    _no_unknown(value, _SUT_FIELDS[form], where, prefix="sut.")
    if form == "embedded":
        return _embedded_sut(value["embedded"], here, where)
    domain = _optional_text(value.get("domain"), "sut.domain", where)
    if form == "address":
        return AddressSut(_address(value["address"], "sut.address", where), domain)
    address = _optional_text(value.get("address"), "sut.address", where)
    timeout = _seconds(value.get("timeout", DEFAULT_READY_TIMEOUT), "sut.timeout", where)
    if address is not None:
        _sut_variables(address, "sut.address", where)
    if form == "kamailio":
        config = _sut_file(value["kamailio"], here, "sut.kamailio", where)
        _sut_variables(_read_text(config, _Where(config)), "sut.kamailio", where)
        return StartedSut("kamailio", here, config=config, address=address, domain=domain, timeout=timeout)
    command = tuple(_tokens(value["command"], "sut.command", where))
    for token in command:
        _sut_variables(token, "sut.command", where)
    ready = _readiness(value.get("ready"), where)
    if address is None and ready.kind != "tcp":
        raise where.error("sut.address", "a SuT ready by its log needs 'address: HOST:PORT' (what ${sut} is)")
    return StartedSut("command", here, command=command, ready=ready, address=address, domain=domain, timeout=timeout)


def _embedded_sut(value: Any, here: Path, where: _Where) -> EmbeddedSut:
    if value is None:
        return EmbeddedSut()
    if not isinstance(value, dict):
        raise where.error("sut.embedded", f"expected a mapping (auth, users), got {_kind(value)}")
    _no_unknown(value, {"auth", "users"}, where, prefix="sut.embedded.")
    auth = value.get("auth", False)
    if not isinstance(auth, bool):
        raise where.error("sut.embedded.auth", f"expected true or false, got {_kind(auth)}")
    if auth != ("users" in value):
        raise where.error(
            "sut.embedded.users" if auth else "sut.embedded.auth",
            "auth and users go together: 'auth: true' and 'users: FILE' (a CSV of user;domain;password lines)",
        )
    return (
        EmbeddedSut(auth=True, users=_sut_file(value["users"], here, "sut.embedded.users", where))
        if auth
        else EmbeddedSut()
    )


def _readiness(value: Any, where: _Where) -> Readiness:
    match = _READY.match(value) if isinstance(value, str) else None
    if match is None:
        raise where.error("sut.ready", f"expected 'tcp:PORT', 'tcp:HOST:PORT' or 'log: REGEX', got {_kind(value)}")
    kind, target = match.group(1), match.group(2)
    _sut_variables(target, "sut.ready", where)
    if kind == "log":
        try:
            re.compile(target)
        except re.error as error:
            raise where.error("sut.ready", f"not a regular expression: {error}") from None
    elif not variables.references(target):
        _address(target if ":" in target else f"127.0.0.1:{target}", "sut.ready", where)
    return Readiness(kind, target)


def _sut_variables(text: str, field_name: str, where: _Where) -> None:
    try:
        variables.check_known(text, STARTED_SUT_VARIABLES)
    except variables.UnknownVariable as error:
        raise where.error(field_name, f"{error}; a started SuT has {', '.join(STARTED_SUT_VARIABLES)}") from None


def _sut_file(value: Any, here: Path, field_name: str, where: _Where) -> Path:
    path = here / _text(value, field_name, where)
    if not path.is_file():
        raise where.error(field_name, f"no such file: {path} (paths are relative to the test file)")
    return path


def _address(value: Any, field_name: str, where: _Where) -> str:
    text = _text(value, field_name, where)
    try:
        split_host_port(text)
    except ValueError:
        raise where.error(field_name, f"expected 'embedded' or HOST:PORT, got {text!r}") from None
    return text


def _vars(value: Any, where: _Where) -> dict[str, str]:
    if not isinstance(value, dict):
        raise where.error("vars", f"expected a mapping of names to values, got {_kind(value)}")
    result = {}
    for name, text in value.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise where.error("vars", f"expected names of letters, digits and '_', got {name!r}")
        if name in variables.BUILTIN or name in variables.SUT_VARIABLES + transport.VARIABLES["wss"]:
            raise where.error(f"vars.{name}", "this name is set by fdkeeper run; choose another")
        result[name] = _text(text, f"vars.{name}", where)
    return result


def _tokens(value: Any, field_name: str, where: _Where, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        try:
            tokens = shlex.split(value)
        except ValueError as error:
            raise where.error(field_name, f"cannot split it into arguments: {error}") from None
    elif isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        tokens = [str(v) for v in value]
    else:
        raise where.error(field_name, f"expected a list of arguments or one line, got {_kind(value)}")
    if not tokens and not allow_empty:
        raise where.error(field_name, "expected at least one argument")
    return tokens


def _names(value: Any, field_name: str, where: _Where) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(_text(v, field_name, where) for v in values)


def _seconds(value: Any, field_name: str, where: _Where, allow_zero: bool = False) -> float:
    text = str(value).strip()
    number = text[:-1].strip() if text.endswith("s") else text
    try:
        seconds = float(number)
    except ValueError:
        raise where.error(field_name, f"expected seconds, got {_kind(value)}") from None
    in_range = 0 <= seconds <= MAX_SECONDS and (allow_zero or seconds > 0)  # NaN is in no range
    if isinstance(value, bool) or not in_range:
        lowest = "0 or more" if allow_zero else "above 0"
        raise where.error(
            field_name, f"expected seconds ({lowest}) up to {MAX_SECONDS:.0f} (a day), got {_kind(value)}"
        )
    return seconds


def _count(value: Any, field_name: str, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise where.error(field_name, f"expected a whole number (0 or more), got {_kind(value)}")
    return value


def _expect(value: Any, kind: str, where: _Where) -> Expect:
    if not isinstance(value, dict):
        raise where.error("expect", f"expected a mapping (exit, successful, failed), got {_kind(value)}")
    for key in value:
        if key not in EXPECT_FIELDS:
            raise where.error(f"expect.{key}", f"unknown field (known: {', '.join(sorted(EXPECT_FIELDS))})")
    counts = {key: _count(value[key], f"expect.{key}", where) for key in ("successful", "failed") if key in value}
    if counts and kind != "sipp":
        raise where.error("expect", "call counts are read from sipp's statistics: only a 'sipp' step has them")
    exit_status = value.get("exit", 0)
    if isinstance(exit_status, bool) or not isinstance(exit_status, int):
        raise where.error("expect.exit", f"expected an exit status (a whole number), got {_kind(exit_status)}")
    return Expect(exit=exit_status, **counts)
