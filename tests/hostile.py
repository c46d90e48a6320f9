"""A corpus of hostile metric payloads: FR52 disguises and impersonations of the daemon's and
Prometheus' own series. Each disguise is its own family, so one payload carries them all and
every one of them must be dropped (and counted) while the honest family next to them passes.

`payload("text")` is a text 0.0.4 exposition, `payload("openmetrics")` the same as OpenMetrics
(plus what only OpenMetrics can say: statesets, exemplars, units).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

HONEST = "# HELP rogue_jobs Jobs waiting.\n# TYPE rogue_jobs gauge\nrogue_jobs{queue=\"a\"} 3\n"

# (family, lines in both formats, reason it must be dropped for)
BOTH: list[tuple[str, str, str]] = [
    ("halt:state", "# TYPE halt:state gauge\nhalt:state 1\n", "denied"),
    ("HALT_STATE", "# TYPE HALT_STATE gauge\nHALT_STATE 1\n", "denied"),
    ("Halt_State", "# TYPE Halt_State gauge\nHalt_State 1\n", "denied"),
    ("halt__state", "# TYPE halt__state gauge\nhalt__state 1\n", "denied"),
    ("haltstate", "# TYPE haltstate gauge\nhaltstate 1\n", "denied"),
    ("constitutional:breach:count",
     "# TYPE constitutional:breach:count gauge\nconstitutional:breach:count 4\n", "denied"),
    ("dissent_health", "# TYPE dissent_health gauge\ndissent_health 0.5\n", "denied"),
    ("witness_coverage", "# TYPE witness_coverage gauge\nwitness_coverage 99\n", "denied"),
    ("my_override_frequency_per_day",
     "# TYPE my_override_frequency_per_day gauge\nmy_override_frequency_per_day 2\n", "denied"),
    ("Dissent_Health_Ratio", "# TYPE Dissent_Health_Ratio gauge\nDissent_Health_Ratio 1\n",
     "denied"),
    ("x_label_name", '# TYPE x_label_name gauge\nx_label_name{halt_state="1"} 1\n', "denied"),
    ("x_label_value", '# TYPE x_label_value gauge\nx_label_value{name="halt_state"} 1\n',
     "denied"),
    ("x_value_case", '# TYPE x_value_case gauge\nx_value_case{name="HALT-STATE"} 1\n', "denied"),
    ("x_value_unicode", '# TYPE x_value_unicode gauge\n'
     'x_value_unicode{v="\uff28\uff21\uff2c\uff34\uff3f\uff33\uff34\uff21\uff34\uff25"} 1\n',
     "denied"),
    ("x_value_zero_width", '# TYPE x_value_zero_width gauge\n'
     'x_value_zero_width{v="halt\u200bstate"} 1\n', "denied"),
    ("halt", '# TYPE halt gauge\nhalt{state="halted"} 1\n', "denied"),  # name + label name
    ("x_flag", '# TYPE x_flag gauge\nx_flag{Halt="on"} 1\n', "denied"),
    ("x_key_value", '# TYPE x_key_value gauge\nx_key_value{halt="state"} 1\n', "denied"),
    ("x_help", "# HELP x_help halt_state=1\n# TYPE x_help gauge\nx_help 1\n", "denied"),
    ("x_help_word", "# HELP x_help_word The Constitutional thing.\n# TYPE x_help_word gauge\n"
     "x_help_word 1\n", "denied"),
    ("my_halt_state_seconds", "# TYPE my_halt_state_seconds histogram\n"
     'my_halt_state_seconds_bucket{le="1.0"} 1\nmy_halt_state_seconds_bucket{le="+Inf"} 1\n'
     "my_halt_state_seconds_sum 0.5\nmy_halt_state_seconds_count 1\n", "denied"),
    ("breach", "# TYPE breach summary\nbreach_sum 1\nbreach_count 1\n", "denied"),
    # Impersonation of Prometheus' and the daemon's own series.
    ("up", "# TYPE up gauge\nup 0\n", "reserved"),
    ("dependency_up", '# TYPE dependency_up gauge\ndependency_up{check="database"} 0\n',
     "reserved"),
    ("service_up", "# TYPE service_up gauge\nservice_up 0\n", "reserved"),
    ("uptime_seconds", "# TYPE uptime_seconds gauge\nuptime_seconds 0\n", "reserved"),
    ("scrape_duration_seconds",
     "# TYPE scrape_duration_seconds gauge\nscrape_duration_seconds 9\n", "reserved"),
    ("config_last_reload_successful", "# TYPE config_last_reload_successful gauge\n"
     "config_last_reload_successful 0\n", "reserved"),
    ("ALERTS", '# TYPE ALERTS gauge\nALERTS{alertname="SupervisorDown",alertstate="firing"} 1\n',
     "reserved"),
    ("Service_Scrape_Up", "# TYPE Service_Scrape_Up gauge\nService_Scrape_Up 0\n", "reserved"),
    # OpenMetrics writes `a:b` samples as `a_b`: a colon name is invalid for exporters anyway.
    ("dependency:up", "# TYPE dependency:up gauge\ndependency:up 0\n", "reserved"),
    ("rogue:halt", "# TYPE rogue:halt gauge\nrogue:halt 0\n", "invalid"),
    # What `promtool check metrics` would fail all of /v1/metrics for.
    ("rogueCamel", "# TYPE rogueCamel gauge\nrogueCamel 1\n", "invalid"),
    ("rogue_latency_ms", "# TYPE rogue_latency_ms gauge\nrogue_latency_ms 1\n", "invalid"),
    ("rogue_milliseconds", "# TYPE rogue_milliseconds gauge\nrogue_milliseconds 1\n",
     "invalid"),
    ("rogue_le", '# TYPE rogue_le gauge\nrogue_le{le="1"} 1\n', "invalid"),
    ("rogue_jobs_gauge", "# TYPE rogue_jobs_gauge gauge\nrogue_jobs_gauge 1\n", "invalid"),
    ("rogue_label", '# TYPE rogue_label gauge\nrogue_label{fooBar="1"} 1\n', "invalid"),
]
TEXT_ONLY: list[tuple[str, str, str]] = [
    # Only the text parser lets these through; promtool's parser would refuse them.
    ("rogue_le_text", '# TYPE rogue_le_text histogram\nrogue_le_text_bucket{le="abc"} 1\n'
     'rogue_le_text_bucket{le="+Inf"} 1\nrogue_le_text_sum 1\nrogue_le_text_count 1\n',
     "invalid"),
    ("rogue_quantile", '# TYPE rogue_quantile summary\nrogue_quantile{quantile="x"} 1\n'
     "rogue_quantile_sum 1\nrogue_quantile_count 1\n", "invalid"),
    ("constitutional_breaches", "# TYPE constitutional_breaches_total counter\n"
     "constitutional_breaches_total 4\n", "denied"),
    ("scrape_samples", "# TYPE scrape_samples_total counter\nscrape_samples_total 1\n",
     "reserved"),
    # The text form of a stateset: a gauge with a label named like itself.
    ("halt_", '# TYPE halt_ gauge\nhalt_{halt_="halted"} 1\nhalt_{halt_="running"} 0\n',
     "denied"),
    # Shapes the text parser takes but OpenMetrics' refuses: written as they came, they would
    # make all of /v1/metrics unreadable to an OpenMetrics scraper (Prometheus asks for it).
    ("rogue_no_inf", '# TYPE rogue_no_inf histogram\nrogue_no_inf_bucket{le="1"} 1\n'
     "rogue_no_inf_sum 1\nrogue_no_inf_count 1\n", "invalid"),
    ("rogue_le_count", '# TYPE rogue_le_count histogram\nrogue_le_count_bucket{le="+Inf"} 1\n'
     'rogue_le_count_sum 1\nrogue_le_count_count{le="1"} 1\n', "invalid"),
    ("rogue_buckets_down", '# TYPE rogue_buckets_down histogram\n'
     'rogue_buckets_down_bucket{le="1"} 5\nrogue_buckets_down_bucket{le="+Inf"} 2\n'
     "rogue_buckets_down_sum 1\nrogue_buckets_down_count 2\n", "invalid"),
    ("rogue_le_order", '# TYPE rogue_le_order histogram\nrogue_le_order_bucket{le="+Inf"} 2\n'
     'rogue_le_order_bucket{le="1"} 2\nrogue_le_order_sum 1\nrogue_le_order_count 2\n',
     "invalid"),
    ("rogue_count_off", '# TYPE rogue_count_off histogram\nrogue_count_off_bucket{le="+Inf"} 2\n'
     "rogue_count_off_sum 1\nrogue_count_off_count 7\n", "invalid"),
    ("rogue_half_bucket", '# TYPE rogue_half_bucket histogram\n'
     'rogue_half_bucket_bucket{le="+Inf"} 1.5\nrogue_half_bucket_sum 1\n'
     "rogue_half_bucket_count 1.5\n", "invalid"),
    ("rogue_negative", "# TYPE rogue_negative counter\nrogue_negative -3\n", "invalid"),
    ("rogue_nan_counter", "# TYPE rogue_nan_counter counter\nrogue_nan_counter NaN\n",
     "invalid"),
    ("rogue_quantile_neg", '# TYPE rogue_quantile_neg summary\n'
     'rogue_quantile_neg{quantile="0.5"} -1\nrogue_quantile_neg_sum 1\n'
     "rogue_quantile_neg_count 1\n", "invalid"),
]
OPENMETRICS_ONLY: list[tuple[str, str, str]] = [
    # A summary's `_created` with a quantile: text writes `_created` as a gauge of its own.
    ("rogue_created_q", '# TYPE rogue_created_q summary\nrogue_created_q{quantile="0.5"} 1\n'
     'rogue_created_q_sum 1\nrogue_created_q_count 1\nrogue_created_q_created{quantile="0.5"} 1\n',
     "invalid"),
    ("constitutional_breaches", "# TYPE constitutional_breaches counter\n"
     "constitutional_breaches_total 4\n", "denied"),
    ("scrape_samples", "# TYPE scrape_samples counter\nscrape_samples_total 1\n", "reserved"),
    ("halt_", '# TYPE halt_ stateset\nhalt_{halt_="halted"} 1\nhalt_{halt_="running"} 0\n',
     "denied"),
    ("x_exemplar", "# TYPE x_exemplar counter\n"
     'x_exemplar_total 1 # {trace_id="halt_state"} 1\n', "denied"),
    ("rogue_gh", '# TYPE rogue_gh gaugehistogram\nrogue_gh_bucket{le="+Inf"} 1\n'
     "rogue_gh_gcount 1\nrogue_gh_gsum 1\n", "invalid"),
    ("x_unit_override_frequency", "# TYPE x_unit_override_frequency gauge\n"
     "# UNIT x_unit_override_frequency override_frequency\nx_unit_override_frequency 1\n",
     "denied"),
]
# Pass: an exemplar (removed on the way), and types the text format writes as gauges.
EXEMPLAR_OK = ("# TYPE rogue_done counter\nrogue_done_total 1 # {trace_id=\"abc\"} 1\n"
               '# TYPE rogue_build info\nrogue_build_info{version="1"} 1\n'
               '# TYPE rogue_mode stateset\nrogue_mode{rogue_mode="a"} 1\n'
               'rogue_mode{rogue_mode="b"} 0\n')


def cases(fmt: str) -> list[tuple[str, str, str]]:
    return BOTH + (TEXT_ONLY if fmt == "text" else OPENMETRICS_ONLY)


def payload(fmt: str) -> str:
    body = HONEST + "".join(lines for _, lines, _ in cases(fmt))
    if fmt == "openmetrics":
        body += EXEMPLAR_OK + "# EOF\n"
    return body


CONTENT_TYPES = {"text": "text/plain; version=0.0.4; charset=utf-8",
                 "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
_FOLDED = re.compile(r"haltstate|constitutional|dissenthealth|witnesscoverage|"
                     r"overridefrequency|breachcount")


def leaks(texts: Iterable[str]) -> list[str]:
    """Texts in which a denied word survives, folded independently of the code under test
    (compatibility forms, case, every non-alphanumeric character dropped)."""
    return [t for t in texts if _FOLDED.search(_fold(t))]


def _fold(text: str) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKD", text)
                   if not unicodedata.combining(c))
    return re.sub(r"[^a-z0-9]+", "", text.casefold())


def exposition_texts(body: str, openmetrics: bool) -> list[str]:
    """Every name, label name and value, HELP and exemplar text in an exposition, plus the
    family/label joins a reader makes (`halt{state=...}`)."""
    if openmetrics:
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as parse,
        )
    else:
        parse = text_string_to_metric_families
    out: list[str] = []
    for family in parse(body):
        out += [family.name, family.documentation, family.unit]
        for s in family.samples:
            out.append(s.name)
            for k, v in s.labels.items():
                out += [k, v, family.name + k, k + v, family.name + v, k + "state"]
                if k == family.name:
                    out.append(family.name + "state")
            if s.exemplar is not None:
                out += [f"{k}{v}" for k, v in s.exemplar.labels.items()]
    # Raw lines too, in case the parser hides something.
    out += body.splitlines()
    return out


def impersonations(body: str, openmetrics: bool) -> list[str]:
    """Series in the daemon's or Prometheus' name spaces that do not come from the daemon."""
    if openmetrics:
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as parse,
        )
    else:
        parse = text_string_to_metric_families
    bad = []
    for family in parse(body):
        for s in family.samples:
            name = s.name.lower()
            if name == "up" or name.startswith("scrape_"):
                bad.append(s.name)
            elif name.startswith(("dependency_", "config_")) and s.labels.get(
                    "service") != "supervisor":
                bad.append(f"{s.name}{s.labels}")
    return bad



def openmetrics_ok(body: bytes) -> None:
    """An OpenMetrics body parses with prometheus_client's strict parser, and `promtool check
    metrics` finds nothing in it but its known false positive: promtool lints with the text
    0.0.4 parser, which reads a counter's `x_total` sample (HELP/TYPE on `x`, as OpenMetrics
    requires) as a family of its own without HELP (see /work/shared/traps.md)."""
    import shutil
    import subprocess

    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    assert body.strip() and body.endswith(b"# EOF\n")
    families = list(parse(body.decode()))
    counters = {f.name + "_total" for f in families if f.type == "counter" and f.documentation}
    # promtool's parser does not know OpenMetrics' `unknown` type (text: `untyped`) and would
    # stop there; lint everything else.
    unknown = {f.name for f in families if f.type == "unknown"}
    if unknown:
        body = b"".join(line for line in body.splitlines(keepends=True)
                        if re.split(rb"[ {]", line.removeprefix(b"# HELP ").removeprefix(
                            b"# TYPE "), maxsplit=1)[0].decode() not in unknown)
    promtool = shutil.which("promtool")
    assert promtool is not None
    done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=30)
    problems = [line for line in (done.stdout + done.stderr).decode().splitlines() if line]
    unexpected = [p for p in problems if not (p.endswith(" no help text")
                                              and p.split()[0] in counters)]
    assert not unexpected, unexpected
    assert done.returncode in ((0,) if not problems else (3,)), problems
