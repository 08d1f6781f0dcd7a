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
# this script with the embedded Kamailio.
set -eu
: "${SUT:?the SuT address, e.g. 127.0.0.1:5060}" "${USERS:?the users CSV}" "${CALLER:?the command that places the call}"
SCENARIOS=${SCENARIOS:-scenarios}
ANSWER_PORT=${ANSWER_PORT:-5070}

fdkeeper sipp -sf "$SCENARIOS/uac-register.xml" -inf "$USERS" -t t1 -i 127.0.0.1 -m 1 "$SUT"

rm -f answer.ready
fdkeeper sipp --ready-file answer.ready --ready-timeout 30 \
  -sf "$SCENARIOS/uas-answer.xml" -t t1 -i 127.0.0.1 -p "$ANSWER_PORT" -m 1 "$SUT" &
answer=$!

# Bounded wait for the file (30 s), ending early if the answer run ends first.
tries=0
until [ -e answer.ready ]; do
  kill -0 "$answer" 2>/dev/null || { echo "answer run ended before it was ready" >&2; wait "$answer"; exit 1; }
  tries=$((tries + 1))
  [ "$tries" -le 300 ] || { echo "answer run not ready after 30 s" >&2; kill "$answer"; exit 1; }
  sleep 0.1
done

$CALLER
wait "$answer"
