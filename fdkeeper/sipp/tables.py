"""sipp's option tables, release by release, as data.

Taken from the options_table in sipp's src/sipp.cpp at each release tag. All fdkeeper needs
of an option is how many words follow it: 0 for the types HELP, VERSION, SETFLAG, UNSETFLAG
(and NEED_SSL/NEED_SCTP, which only stop sipp), 2 for KEY, VAR and INDEX_FILE (-key, -set,
-infindex), 1 for every other type. Options that exist only in some builds (#ifdef USE_TLS,
USE_SCTP, RTP_STREAM) are listed with the arity of the build that has them: fdkeeper reads
-tls_* itself, and a build without SCTP refuses its options anyway.

A release's table is the previous one plus what it added and minus what it removed, so the
differences between sipp releases read as they happened.
"""

from __future__ import annotations

from dataclasses import dataclass

# sipp 3.6.0 and 3.6.1 (Debian 12's sip-tester).
_FLAGS_3_6 = """
    h help v bind_local bg nostdin skip_rlimit aa nd pause_msg_ign callid_slash_ign rtp_echo no_rate_quit
    timeout_error nr trace_stat periodic_rtd trace_msg trace_shortmsg trace_counts trace_err
    trace_error_codes trace_timeout trace_calldebug trace_screen trace_rtt trace_logs
"""
_VALUED_3_6 = """
    sd sf oocsf oocsn sn t i p ci cp max_socket max_reconnect reconnect_close reconnect_sleep rsa
    tls_cert tls_key tls_ca tls_crl tls_version multihome heartbeat assocmaxret pathmaxret pmtu
    gracefulclose plugin sleep buff_size sendbuffer_warn lost tdmmap dynamicStart dynamicMax dynamicStep
    base_cseq cid_str d deadcall_wait auth_uri au ap s default_behaviors inf ip_field mi mb mp
    rtp_payload rtp_threadtasks rtp_buffsize r rp rate_scale rate_increase rate_max rate_interval l m
    users recv_timeout send_timeout timeout max_retrans max_invite_retrans max_non_invite_retrans
    rtcheck T2 3pcc master slave slave_cfg timer_resol max_recv_loops max_sched_loops watchdog_interval
    watchdog_reset watchdog_minor_threshold watchdog_major_threshold watchdog_major_maxtriggers
    watchdog_minor_maxtriggers f stat_delimiter stf fd message_file message_overwrite shortmessage_file
    shortmessage_overwrite error_file error_overwrite calldebug_file calldebug_overwrite screen_file
    screen_overwrite rtt_freq log_file log_overwrite ringbuffer_files ringbuffer_size max_log_size
"""
_PAIRS = "key set infindex"


@dataclass(frozen=True)
class OptionTable:
    """The options of one range of sipp releases, from `release` on."""

    release: tuple[int, int, int]
    flags: frozenset[str]
    valued: frozenset[str]
    pairs: frozenset[str]

    @property
    def label(self) -> str:
        return ".".join(map(str, self.release))

    def arity(self, name: str) -> int | None:
        """How many words follow -NAME, None if this sipp has no such option."""
        if name in self.flags:
            return 0
        if name in self.valued:
            return 1
        return 2 if name in self.pairs else None

    def changed(
        self, release: tuple[int, int, int], *, flags: str = "", valued: str = "", removed: str = ""
    ) -> OptionTable:
        gone = frozenset(removed.split())
        return OptionTable(
            release=release,
            flags=(self.flags | frozenset(flags.split())) - gone,
            valued=(self.valued | frozenset(valued.split())) - gone,
            pairs=self.pairs - gone,
        )


SIPP_3_6 = OptionTable(
    (3, 6, 0), frozenset(_FLAGS_3_6.split()), frozenset(_VALUED_3_6.split()), frozenset(_PAIRS.split())
)
SIPP_3_7_0 = SIPP_3_6.changed(
    (3, 7, 0),
    flags="rtpcheck_debug srtpcheck_debug",
    valued="min_rtp_port max_rtp_port audiotolerance videotolerance",
    removed="mp",
)
SIPP_3_7_3 = SIPP_3_7_0.changed((3, 7, 3), valued="bind_to_device mp")
# 3.7.5 lists the mixed-mode options as -rxsf and -rxrn, but its parser only knows -rxsf and
# -rxsn: -rxrn stops with "Internal error" and -rxsn is an "Invalid argument" (BROKEN below).
SIPP_3_7_5 = SIPP_3_7_3.changed((3, 7, 5), flags="random_base_ssrc rfc3339", valued="rxsf rxrn rxinf")

TABLES = (SIPP_3_6, SIPP_3_7_0, SIPP_3_7_3, SIPP_3_7_5)
NEWEST = TABLES[-1]
# The newest release these tables were checked against; a later one may have options they lack.
NEWEST_CHECKED = (3, 7, 7)

# Options that the sipp releases listing them do not accept as documented: what to use instead.
BROKEN_SINCE = SIPP_3_7_5.release
BROKEN = {
    "rxsn": "sipp 3.7.5-3.7.7 rejects -rxsn (its option table calls it -rxrn, which fails too); "
    "use -rxsf FILE (sipp -sd uas > uas.xml writes the embedded one)",
    "rxrn": "sipp 3.7.5-3.7.7 stops at -rxrn with an internal error; use -rxsf FILE "
    "(sipp -sd uas > uas.xml writes the embedded one)",
}


def table_for(version: tuple[int, int, int] | None) -> OptionTable | None:
    """The table of sipp `version`, None when fdkeeper does not know that version."""
    if version is None or not SIPP_3_6.release <= version <= NEWEST_CHECKED:
        return None
    return [table for table in TABLES if table.release <= version][-1]


def first_release_with(name: str) -> OptionTable | None:
    """The first known release that has option -NAME (for "sipp X.Y has it" hints)."""
    return next((table for table in TABLES if table.arity(name) is not None), None)
