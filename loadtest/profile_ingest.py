#!/usr/bin/env python3
"""Where the ingest's CPU per request goes, from a `perf record -g` profile (bench_ingest.py --perf).

Two views of the same samples:
  stages  inclusive share of the request path's own steps (a function and what it calls):
          auth, rate limit, body read, parse + validate, price, encode, produce, response, the
          request-id/metrics middleware (its own part: the whole middleware minus the handler)
  areas   self time by where the code lives: the kernel, the HTTP stack (hyper, axum, http),
          the tokio runtime, the allocator, Tally's own crates, serde_json, the rest
Each share is also shown in microseconds of CPU per request when --us-per-request is given (the
figure measured without perf in the same run of bench_ingest.py).

With --against CEILING.data --against-us US (the ceiling's profile and measured CPU per request
from the same run), a third view: where the microseconds above the ceiling go, symbol by symbol
(self time in us per request, this profile's minus the ceiling's; kernel and user space apart).

Usage: loadtest/profile_ingest.py PERF.data [--us-per-request US] [--json OUT]
                                            [--against CEILING.data --against-us US]
"""
import argparse
import json
import re
import subprocess
import sys

# (stage, pattern): a stage's share is the largest inclusive share of the symbols its pattern
# matches. perf names a function once outlined (`a::b::f`) and again where it was inlined
# (`f<...>`, `{async_fn_env#0}`...), nested in each other, so the largest is the whole of it.
STAGES = [
    # The handler: an axum handler until session 20, since then the future `IngestService` boxes.
    ("whole handler", r"tally_ingest::handler::handle\b"
                      r"|IngestService as tower_service::Service<.*>>::call::\{\{closure\}\}::\{\{closure\}\}"),
    ("auth (key lookup)", r"KeySet::lookup|keys::hash\b"),
    ("rate limit", r"OrgLimits::admit"),
    ("body read", r"tally_ingest::body::read\b"),
    ("parse + validate", r"parse::parse_batch"),
    ("price + encode (+ rejects)", r"handler::sort_events"),
    ("encode", r"record::encode_event"),
    ("produce (sink)", r"handler::produce\b"),
    ("response (JSON body, headers)", r"IntoResponse for \(http::status::StatusCode, axum::json::Json|rate_limit_headers"
                                      r"|handler::accepted_response\b"),
    ("dispatch and request id (before the handler)", r"IngestService as tower_service::Service<[^{]*>>::call$"
                                                      r"|server::Observe<S> as tower_service::Service<[^{]*>>::call$"),
    ("middleware incl. handler", r"FromFn<.*as tower_service::Service<.*>>::call::\{\{closure\}\}|server::observe\b"
                                 r"|server::ObserveFuture<F> as core::future::future::Future>::poll"),
    ("writing responses (hyper flush: sendmsg)", r"h1::io::Buffered<T,B>::poll_flush"),
    ("reading requests (hyper read: recvmsg)", r"h1::io::Buffered<T,B>::poll_read_from_io"),
]

AREAS = [
    ("kernel", lambda s, dso: s.startswith("[k]")),
    ("allocator", lambda s, dso: re.search(r"\bmi_|_mi_|mimalloc|__rust_alloc|__rust_dealloc|__rdl_", s) is not None),
    ("libc (memcpy, ...)", lambda s, dso: "libc" in dso),
    ("serde / serde_json", lambda s, dso: re.search(r"serde_json::|serde::|<serde", s) is not None),
    ("Tally (tally_*)", lambda s, dso: re.search(r"tally_", s) is not None),
    ("HTTP stack (hyper, axum, http, tower)", lambda s, dso: re.search(r"hyper|axum|\bhttp::|httparse|tower|matchit|h1", s) is not None),
    ("tokio runtime", lambda s, dso: "tokio" in s),
    ("prometheus", lambda s, dso: "prometheus" in s),
    ("tracing", lambda s, dso: "tracing" in s),
]

LINE = re.compile(r"^\s*([\d.]+)%\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")


def report(path):
    out = subprocess.run(["perf", "report", "-i", path, "--stdio", "--children", "--sort", "dso,sym", "-g", "none",
                          "--percent-limit", "0", "--no-header"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            children, self_, dso, kind, sym = m.groups()
            rows.append((float(children), float(self_), dso, ("[k] " if kind == "k" else "") + sym))
    return rows


def self_us(rows, us_per_request):
    """Self time per symbol in us per request (a symbol's hash suffix dropped: two builds' names match)."""
    out = {}
    for _, self_, _, sym in rows:
        key = re.sub(r"::h[0-9a-f]{16}$", "", sym)
        out[key] = out.get(key, 0.0) + self_ * us_per_request / 100.0
    return out


def difference(rows, us, ceiling_rows, ceiling_us, top=30):
    """Where the microseconds above the ceiling go: self time by symbol, this server's minus the
    ceiling's, both scaled to their own measured CPU per request."""
    mine, theirs = self_us(rows, us), self_us(ceiling_rows, ceiling_us)
    kernel_mine, kernel_theirs = (sum(v for k, v in d.items() if k.startswith("[k]")) for d in (mine, theirs))
    print("  above the ceiling (%.2f us against %.2f: %.2fx), self time in us per request:" % (us, ceiling_us, us / ceiling_us))
    print("    %-48s %8.2f us  (%.2f against %.2f)" % ("kernel", kernel_mine - kernel_theirs, kernel_mine, kernel_theirs))
    print("    %-48s %8.2f us  (%.2f against %.2f)" % ("user space", (us - kernel_mine) - (ceiling_us - kernel_theirs),
                                                        us - kernel_mine, ceiling_us - kernel_theirs))
    diffs = sorted(((mine.get(k, 0.0) - theirs.get(k, 0.0), k) for k in set(mine) | set(theirs)), reverse=True)
    print("  the %d symbols that add most (us per request: difference, this server, the ceiling):" % top)
    for diff, sym in diffs[:top]:
        print("    %7.3f %7.3f %7.3f  %s" % (diff, mine.get(sym, 0.0), theirs.get(sym, 0.0), sym[:100]))
    print("  the ceiling's own that this server does not spend (e.g. axum's router it bypasses):")
    for diff, sym in diffs[-8:]:
        print("    %7.3f %7.3f %7.3f  %s" % (diff, mine.get(sym, 0.0), theirs.get(sym, 0.0), sym[:100]))
    return [{"difference_us": d, "symbol": k} for d, k in diffs[:top]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--us-per-request", type=float, default=0.0)
    parser.add_argument("--json", default="")
    parser.add_argument("--against", default="", help="the ceiling's perf data from the same run")
    parser.add_argument("--against-us", type=float, default=0.0, help="the ceiling's measured CPU us per request")
    args = parser.parse_args()
    rows = report(args.data)
    if not rows:
        raise SystemExit("no samples in " + args.data)
    if args.against and not (args.us_per_request and args.against_us):
        raise SystemExit("--against needs --us-per-request and --against-us (the measured CPU per request of each)")
    scale = args.us_per_request / 100.0 if args.us_per_request else 0.0

    def fmt(share):
        return "%6.1f %%" % share + ("  %6.2f us" % (share * scale) if scale else "")

    stages = {}
    for stage, pattern in STAGES:
        regex = re.compile(pattern)
        stages[stage] = max([children for children, _, _, sym in rows if regex.search(sym)] or [0.0])
    whole = stages.pop("middleware incl. handler")
    if whole:
        stages["middleware own part (request id, HTTP metrics)"] = max(0.0, whole - stages["whole handler"])
    areas = {name: 0.0 for name, _ in AREAS}
    areas["other"] = 0.0
    for _, self_, dso, sym in rows:
        for name, test in AREAS:
            if test(sym, dso):
                areas[name] += self_
                break
        else:
            areas["other"] += self_
    print("profile %s (%s)" % (args.data, "shares of the server's CPU" + (
        "; us per request from the measured %.2f us" % args.us_per_request if scale else "")))
    print("  stages (inclusive; nested rows overlap their parent):")
    for stage, share in stages.items():
        print("    %-48s %s" % (stage, fmt(share)))
    print("  areas (self time):")
    for name, share in sorted(areas.items(), key=lambda kv: -kv[1]):
        print("    %-48s %s" % (name, fmt(share)))
    top = sorted(rows, key=lambda r: -r[1])[:15]
    print("  top functions by self time:")
    for _, self_, dso, sym in top:
        print("    %6.2f %%  %s" % (self_, sym[:110]))
    above = []
    if args.against:
        ceiling_rows = report(args.against)
        if not ceiling_rows:
            raise SystemExit("no samples in " + args.against)
        above = difference(rows, args.us_per_request, ceiling_rows, args.against_us)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"data": args.data, "us_per_request": args.us_per_request, "stages": stages, "areas": areas,
                       "top": [{"self": s, "dso": d, "symbol": y} for _, s, d, y in top],
                       "above_ceiling": above}, out, indent=1)


if __name__ == "__main__":
    sys.exit(main())
