// vmrunner runs the cases of `cargo xtask test-arm64` inside the arm64 VM (busybox has no
// language that could drive the ready/go protocol of tests/go/internal/protocol). It reads the
// cases from a JSON file, runs each one, and prints each result on stdout (the serial console)
// as one JSON document, base64-encoded between "=====BEGIN <name>.json" and "=====END" lines,
// as soon as the case is done. It checks nothing: the host compares what deferprobe reported
// with the programs' own ground truth.
//
// A case may start a target program that speaks the protocol ("ready" on stdout, a line on
// stdin to start working, its ground truth as one JSON line, then holding its state until stdin
// closes). Then, in order:
//   - attach: deferprobe with these arguments plus "--pid PID" is started before the target
//     works, and the target is told to go once deferprobe says "probes attached"; the target's
//     ground-truth line is read; then deferprobe is stopped: "sigint" sends it SIGINT after
//     stop_after_ms (the target still holds its state), "target_exit" closes the target's stdin
//     so the target exits and deferprobe ends with it;
//   - without attach, the target is told to go and its ground truth read;
//   - runs: deferprobe invocations, one after the other ("{pid}" in an argument is the
//     target's pid), while the target holds its state;
//   - the target's stdin is closed and its exit status recorded.
//
// Every deferprobe run records its arguments, exit code, stdout, stderr, the file named after
// --report (if any) and its wall time.
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type target struct {
	Program string   `json:"program"`
	Args    []string `json:"args"`
}

type attach struct {
	Args        []string `json:"args"`
	Stop        string   `json:"stop"`
	StopAfterMs int      `json:"stop_after_ms"`
}

type testCase struct {
	Name   string     `json:"name"`
	Target *target    `json:"target"`
	Attach *attach    `json:"attach"`
	Runs   [][]string `json:"runs"`
}

type run struct {
	Args   []string `json:"args"`
	Code   int      `json:"code"`
	Stdout string   `json:"stdout"`
	Stderr string   `json:"stderr"`
	Report *string  `json:"report"`
	Ms     int64    `json:"ms"`
}

type result struct {
	Name       string          `json:"name"`
	Truth      json.RawMessage `json:"truth"`
	TargetCode *int            `json:"target_code"`
	TargetErr  string          `json:"target_stderr"`
	Runs       []run           `json:"runs"`
	Error      string          `json:"error,omitempty"`
	Ms         int64           `json:"ms"`
}

const deferprobe = "/bin/deferprobe"

// stepTimeout bounds every wait, so one hang costs a case, not the VM's whole time.
const stepTimeout = 180 * time.Second

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: vmrunner CASES.json")
		os.Exit(2)
	}
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var cases []testCase
	if err := json.Unmarshal(text, &cases); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, c := range cases {
		started := time.Now()
		r := result{Name: c.Name, Truth: json.RawMessage("null"), Runs: []run{}}
		if err := runCase(&c, &r); err != nil {
			r.Error = err.Error()
		}
		r.Ms = time.Since(started).Milliseconds()
		emit(&r)
	}
}

// emit prints r base64-encoded between markers, in lines of 76 characters.
func emit(r *result) {
	doc, _ := json.Marshal(r)
	encoded := base64.StdEncoding.EncodeToString(doc)
	var out strings.Builder
	fmt.Fprintf(&out, "=====BEGIN %s.json\n", r.Name)
	for len(encoded) > 76 {
		out.WriteString(encoded[:76] + "\n")
		encoded = encoded[76:]
	}
	out.WriteString(encoded + "\n=====END\n")
	os.Stdout.WriteString(out.String())
}

// program is a running target program.
type program struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *bytes.Buffer
}

func startTarget(t *target) (*program, error) {
	cmd := exec.Command(t.Program, t.Args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	s := &program{cmd: cmd, stdin: stdin, lines: make(chan string, 16), stderr: &bytes.Buffer{}}
	cmd.Stderr = s.stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		scanner := bufio.NewScanner(stdout)
		scanner.Buffer(make([]byte, 1<<20), 64<<20)
		for scanner.Scan() {
			s.lines <- scanner.Text()
		}
		close(s.lines)
	}()
	return s, nil
}

// line waits for the target's next stdout line.
func (s *program) line(what string) (string, error) {
	select {
	case line, ok := <-s.lines:
		if !ok {
			return "", fmt.Errorf("the target closed its stdout before %s: %s", what, s.stderr)
		}
		return line, nil
	case <-time.After(stepTimeout):
		return "", fmt.Errorf("no %s from the target within %s", what, stepTimeout)
	}
}

// finish closes the target's stdin and waits for it (killing it after the timeout).
func (s *program) finish(r *result) {
	s.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(stepTimeout):
		s.cmd.Process.Kill()
		<-done
	}
	code := s.cmd.ProcessState.ExitCode()
	r.TargetCode = &code
	r.TargetErr = s.stderr.String()
}

func runCase(c *testCase, r *result) error {
	if c.Target == nil {
		for _, args := range c.Runs {
			r.Runs = append(r.Runs, runDeferprobe(args, 0))
		}
		return nil
	}
	t, err := startTarget(c.Target)
	if err != nil {
		return err
	}
	defer func() {
		if r.TargetCode == nil {
			t.finish(r)
		}
	}()
	if line, err := t.line(`"ready"`); err != nil {
		return err
	} else if line != "ready" {
		return fmt.Errorf("the target said %q, not ready", line)
	}
	pid := t.cmd.Process.Pid
	if c.Attach == nil {
		if _, err := io.WriteString(t.stdin, "go\n"); err != nil {
			return err
		}
		truth, err := t.line("ground truth")
		if err != nil {
			return err
		}
		r.Truth = json.RawMessage(truth)
	} else if err := attachAndWork(c.Attach, t, pid, r); err != nil {
		return err
	}
	for _, args := range c.Runs {
		r.Runs = append(r.Runs, runDeferprobe(args, pid))
	}
	if r.TargetCode == nil {
		t.finish(r)
	}
	return nil
}

// attachAndWork starts deferprobe on the waiting target, lets the target work once the probes
// are attached, reads its ground truth and stops tracing as the case says.
func attachAndWork(a *attach, t *program, pid int, r *result) error {
	args := append(append([]string{}, a.Args...), "--pid", strconv.Itoa(pid))
	started := time.Now()
	cmd := exec.Command(deferprobe, args...)
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	stderrPipe, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	var stderr bytes.Buffer
	attached := make(chan struct{})
	stderrDone := make(chan struct{})
	go func() {
		scanner := bufio.NewScanner(stderrPipe)
		scanner.Buffer(make([]byte, 1<<20), 64<<20)
		seen := false
		for scanner.Scan() {
			stderr.WriteString(scanner.Text() + "\n")
			if !seen && strings.Contains(scanner.Text(), "probes attached") {
				seen = true
				close(attached)
			}
		}
		close(stderrDone)
	}()
	waitTracer := func() run {
		<-stderrDone
		cmd.Wait()
		return record(args, cmd.ProcessState.ExitCode(), stdout.String(), stderr.String(), started)
	}
	select {
	case <-attached:
	case <-stderrDone:
		r.Runs = append(r.Runs, waitTracer())
		return errors.New("deferprobe ended without attaching")
	case <-time.After(stepTimeout):
		cmd.Process.Kill()
		r.Runs = append(r.Runs, waitTracer())
		return fmt.Errorf("deferprobe did not attach within %s", stepTimeout)
	}
	if _, err := io.WriteString(t.stdin, "go\n"); err != nil {
		return err
	}
	truth, err := t.line("ground truth")
	if err != nil {
		cmd.Process.Kill()
		r.Runs = append(r.Runs, waitTracer())
		return err
	}
	r.Truth = json.RawMessage(truth)
	switch a.Stop {
	case "sigint":
		time.Sleep(time.Duration(a.StopAfterMs) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGINT)
		r.Runs = append(r.Runs, waitTracer())
	case "target_exit":
		t.finish(r)
		r.Runs = append(r.Runs, waitTracer())
	default:
		cmd.Process.Kill()
		r.Runs = append(r.Runs, waitTracer())
		return fmt.Errorf("unknown stop %q", a.Stop)
	}
	return nil
}

// runDeferprobe runs deferprobe to its end (killing it after the timeout).
func runDeferprobe(args []string, pid int) run {
	args = append([]string{}, args...)
	for i, arg := range args {
		args[i] = strings.ReplaceAll(arg, "{pid}", strconv.Itoa(pid))
	}
	started := time.Now()
	cmd := exec.Command(deferprobe, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return record(args, -1, "", err.Error(), started)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(stepTimeout):
		cmd.Process.Kill()
		<-done
		stderr.WriteString(fmt.Sprintf("\nvmrunner: killed after %s\n", stepTimeout))
	}
	return record(args, cmd.ProcessState.ExitCode(), stdout.String(), stderr.String(), started)
}

// record is one finished deferprobe run, with the report it wrote (after --report).
func record(args []string, code int, stdout, stderr string, started time.Time) run {
	r := run{Args: args, Code: code, Stdout: stdout, Stderr: stderr,
		Ms: time.Since(started).Milliseconds()}
	for i, arg := range args {
		if arg == "--report" && i+1 < len(args) {
			if text, err := os.ReadFile(args[i+1]); err == nil {
				report := string(text)
				r.Report = &report
			}
		}
	}
	return r
}
