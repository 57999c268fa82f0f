#!/usr/bin/env python3
"""Runs every ```sh block of README.md as written, in order, as a new user
would, and fails on any wrong answer.

Each block is preceded by an annotation (an HTML comment, invisible on the
rendered page); a block without one fails the run, so none is forgotten:

  <!-- ci: start -->   a server command: started in the background, and
                       waited for until its ports answer
  <!-- ci: run; fails: 2; expect: A | B; fresh -->
                       run it; exactly `fails` commands exit non-zero (the
                       README shows refusals on purpose; default 0); each
                       `expect` text appears in what it printed; `fresh`
                       stops the servers of earlier blocks first
  <!-- ci: skip (why) -->  not run here (said why)

Inside a block, `# Terminal N:` comments split it into terminals: every
terminal but the last runs in the background (a server, waited for until
its ports answer, or a subscription, given a moment to start), the last in
the foreground. Commands are typed one at a time, a moment apart, as a
person would; `export` lines before the first terminal hold for all of them.

The gateways store under a temporary KONGTIE_DATA_DIR; `.tools/bin`
(grpcurl) and `target/release` (kongtie-gateway) are on PATH.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATION = re.compile(r"^<!-- ci: (.*) -->$")
TERMINAL = re.compile(r"^# Terminal (\d+)")
FAILED = "__readme_command_failed__"
SERVER_WAIT = 900  # a first `cargo run --release` compiles


def blocks(text):
    """(line number, annotation or None, code) of each ```sh block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start = i
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            m = ANNOTATION.match(lines[j].strip()) if j >= 0 else None
            i += 1
            code = []
            while lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            yield start + 1, (m.group(1) if m else None), "\n".join(code)
        i += 1


def parse(annotation):
    if annotation.startswith("skip"):
        return {"action": "skip"}
    parts = [p.strip() for p in annotation.split(";")]
    spec = {"action": parts[0].split()[0], "fails": 0, "expect": [], "fresh": False}
    for p in parts[1:]:
        if p == "fresh":
            spec["fresh"] = True
        elif p.startswith("fails:"):
            spec["fails"] = int(p.split(":", 1)[1])
        elif p.startswith("expect:"):
            spec["expect"] = [e.strip() for e in p.split(":", 1)[1].split(" | ")]
        else:
            raise SystemExit(f"unknown annotation part {p!r}")
    return spec


def terminals(code):
    """[(terminal number or None for the preamble, text)]."""
    out = [(None, [])]
    for line in code.split("\n"):
        m = TERMINAL.match(line.strip())
        if m:
            out.append((int(m.group(1)), []))
        out[-1][1].append(line)
    return [(n, "\n".join(t)) for n, t in out if "\n".join(t).strip()]


def commands(text):
    """Logical command lines (backslash continuations joined), comments dropped."""
    out, current = [], ""
    for line in text.split("\n"):
        if not current and (not line.strip() or line.strip().startswith("#")):
            continue
        current += line + "\n"
        if not line.rstrip().endswith("\\"):
            out.append(current)
            current = ""
    return out


def typed(text):
    """A script that runs the commands one by one, a moment apart, and
    marks each that fails."""
    script = [f"trap 'echo {FAILED} >&2' ERR", "set -o pipefail"]
    for c in commands(text):
        script.append(c.rstrip("\n"))
        script.append("sleep 0.3")
    return "\n".join(script) + "\n"


def ports_of(text):
    """The TCP ports a server command will listen on."""
    ports = [int(p) for p in re.findall(r"--(?:grpc-addr|addr) [\d.]+:(\d+)", text)]
    if " serve" in text and "--grpc-addr" not in text:
        ports.append(50051)
    return ports


def is_server(text):
    """A terminal that runs the gateway or the standalone sandbox."""
    return any(re.search(r"\s(serve|sandbox)(\s|$)", c) for c in commands(text))


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Runner:
    def __init__(self):
        self.servers = []  # (Popen, log path, ports)
        self.work = tempfile.mkdtemp(prefix="readme-")
        self.env = dict(os.environ)
        self.env["PATH"] = f"{ROOT}/.tools/bin:{ROOT}/target/release:" + self.env["PATH"]
        self.env["KONGTIE_DATA_DIR"] = os.path.join(self.work, "data")
        self.count = 0

    def spawn(self, script, log):
        return subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=self.env,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_path(self):
        self.count += 1
        return os.path.join(self.work, f"{self.count}.log")

    def start_server(self, script, exports):
        log = self.log_path()
        ports = ports_of(script)
        proc = self.spawn(exports + "\n" + "\n".join(commands(script)), log)
        self.servers.append((proc, log, ports))
        deadline = time.time() + SERVER_WAIT
        while not all(answers(p) for p in ports):
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start:\n{script}\n{open(log).read()[-3000:]}")
            time.sleep(0.2)

    def stop_servers(self):
        for proc, _, ports in self.servers:
            stop(proc)
            deadline = time.time() + 20
            while any(answers(p) for p in ports) and time.time() < deadline:
                time.sleep(0.1)
        self.servers = []

    def run(self, line, spec, code):
        if spec["fresh"]:
            self.stop_servers()
        if spec["action"] == "start":
            self.start_server(code, "")
            print(f"README line {line}: started")
            return
        parts = terminals(code)
        exports = "\n".join(
            c.rstrip("\n") for n, t in parts if n is None for c in commands(t) if c.startswith("export ")
        )
        output = ""
        background = []
        for k, (n, text) in enumerate(parts):
            last = k == len(parts) - 1
            if last or n is None:
                log = self.log_path()
                proc = self.spawn(exports + "\n" + typed(text), log)
                try:
                    proc.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    stop(proc)
                    raise SystemExit(f"README line {line}: a command did not finish in 300 s")
                output += open(log).read()
            elif is_server(text):
                self.start_server(text, exports)
            else:
                log = self.log_path()
                background.append((self.spawn(exports + "\n" + typed(text), log), log))
                time.sleep(2)
        time.sleep(0.5)
        for proc, log in background:
            stop(proc)
            output += open(log).read()
        failures = output.count(FAILED)
        missing = [e for e in spec["expect"] if e not in output]
        if failures != spec["fails"] or missing:
            print(output)
            raise SystemExit(
                f"README line {line}: {failures} commands failed (expected {spec['fails']}); "
                f"missing from the output: {missing}"
            )
        print(f"README line {line}: OK ({failures} refusals, as shown)")

    def close(self):
        self.stop_servers()
        shutil.rmtree(self.work, ignore_errors=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main():
    text = open(os.path.join(ROOT, "README.md")).read()
    found = list(blocks(text))
    unannotated = [line for line, a, _ in found if a is None]
    if unannotated:
        raise SystemExit(f"README blocks without a `<!-- ci: ... -->` annotation at lines {unannotated}")
    for port in (50051, 8080, 8090, 9090):
        if answers(port):
            raise SystemExit(f"port {port} is taken: the README's commands use the default ports")
    runner = Runner()
    try:
        for line, annotation, code in found:
            spec = parse(annotation)
            if spec["action"] == "skip":
                print(f"README line {line}: skipped: {annotation[len('skip'):].strip()}")
                continue
            runner.run(line, spec, code)
    finally:
        runner.close()
    print(f"README: {len(found)} blocks, all as written")


if __name__ == "__main__":
    main()
