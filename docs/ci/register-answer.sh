#!/bin/sh
# Register alice over TCP, start the answer run in the background, wait until it is ready
# to receive (no `sleep N`: the answer run writes answer.ready once the kept connection is
# handed to it and sipp listens), then place the call and collect both exit statuses.
#
#   SUT=127.0.0.1:5060 USERS=users.csv CALLER="sipp -sn uac -s alice -m 1 -t u1 127.0.0.1:5060" \
#     sh docs/ci/register-answer.sh
#
# SUT: the SuT's address; USERS: sipp's -inf file for the register run; CALLER: any
# command that calls the registered user through the SuT. tests/core/test_readiness.py runs
# this script with the embedded Kamailio; tests/testrun/test_cancel.py checks that a failing
# command leaves nothing behind.
#
# Safe to cancel: the answer run gets a process group of its own (setsid), and on any exit
# (a command failing under `set -e` too) or signal, the trap ends that group (fdkeeper sipp
# and its sipp): SIGTERM, then SIGKILL after 2 s, so nothing keeps holding ANSWER_PORT.
set -eu
: "${SUT:?the SuT address, e.g. 127.0.0.1:5060}" "${USERS:?the users CSV}" "${CALLER:?the command that places the call}"
SCENARIOS=${SCENARIOS:-scenarios}
ANSWER_PORT=${ANSWER_PORT:-5070}

answer=
stop_answer() {
  [ -n "$answer" ] || return 0
  kill -s TERM -- "-$answer" 2>/dev/null || return 0
  tries=0
  while kill -s 0 -- "-$answer" 2>/dev/null && [ "$tries" -lt 20 ]; do
    tries=$((tries + 1))
    sleep 0.1
  done
  kill -s KILL -- "-$answer" 2>/dev/null || true
  answer=
}
trap 'status=$?; trap - EXIT; stop_answer; exit "$status"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

fdkeeper sipp -sf "$SCENARIOS/uac-register.xml" -inf "$USERS" -t t1 -i 127.0.0.1 -m 1 "$SUT"

rm -f answer.ready
setsid fdkeeper sipp --ready-file answer.ready --ready-timeout 30 \
  -sf "$SCENARIOS/uas-answer.xml" -t t1 -i 127.0.0.1 -p "$ANSWER_PORT" -m 1 "$SUT" &
answer=$!

# Bounded wait for the file (30 s), ending early if the answer run ends first.
tries=0
until [ -e answer.ready ]; do
  kill -0 "$answer" 2>/dev/null || { echo "answer run ended before it was ready" >&2; wait "$answer"; exit 1; }
  tries=$((tries + 1))
  [ "$tries" -le 300 ] || { echo "answer run not ready after 30 s" >&2; exit 1; }
  sleep 0.1
done

$CALLER
wait "$answer"
answer=
