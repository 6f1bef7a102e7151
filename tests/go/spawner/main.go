// spawner starts copies of itself as child processes, one after the other, for the process
// tree tests (tests/e2e/follow.rs). Each process, parent and children, registers a known
// number of heap defers and prints its own ground truth as one JSON line on stdout (the
// children's lines come first):
//
//	{"heap_defers":D,"pid":P,"role":"parent"|"child","children":N}
//
//	-children N   children to start (each with -child)
//	-defers D     heap defers the parent registers; child i registers D+i
//	-exit-code C  the parent's exit status
package main

import (
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"strconv"
)

var sink int

//go:noinline
func loopDefers(n int) {
	for i := 0; i < n; i++ {
		defer func() { sink += i }()
	}
}

type groundTruth struct {
	HeapDefers int    `json:"heap_defers"`
	Pid        int    `json:"pid"`
	Role       string `json:"role"`
	Children   int    `json:"children"`
}

func main() {
	children := flag.Int("children", 3, "children to start")
	defers := flag.Int("defers", 17, "heap defers to register")
	child := flag.Bool("child", false, "run as a child")
	exitCode := flag.Int("exit-code", 0, "exit status")
	flag.Parse()

	truth := groundTruth{Pid: os.Getpid(), Role: "parent"}
	if *child {
		truth.Role = "child"
	} else {
		for i := 0; i < *children; i++ {
			cmd := exec.Command(os.Args[0], "-child", "-defers", strconv.Itoa(*defers+i))
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			if err := cmd.Run(); err != nil {
				panic(err)
			}
			truth.Children++
		}
	}
	loopDefers(*defers)
	truth.HeapDefers += *defers
	line, err := json.Marshal(truth)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(line, '\n'))
	os.Exit(*exitCode)
}
