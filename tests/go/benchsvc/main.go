// benchsvc is the real-service benchmark of `cargo xtask bench` (BENCHMARKS.md): a small
// net/http JSON service. Every request decodes or builds maps, and its handler registers one
// defer (a per-request cleanup, released when the handler returns).
//
//	GET  /items?n=K   a JSON object of K generated entries (built in a map)
//	POST /count       counts the words of the request body in a map, answers the top counts
//	GET  /served      how many /items and /count requests were answered so far (the bench
//	                  measures throughput from it while wrk keeps the load on)
//
// Flags: -addr (default 127.0.0.1:0). It prints "listening on ADDR" once it accepts.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
)

var inFlight, served atomic.Int64

func track() func() {
	inFlight.Add(1)
	return func() { inFlight.Add(-1); served.Add(1) }
}

func items(w http.ResponseWriter, r *http.Request) {
	defer track()()
	n, err := strconv.Atoi(r.URL.Query().Get("n"))
	if err != nil || n < 0 || n > 1000 {
		n = 16
	}
	out := make(map[string]any, n)
	for i := 0; i < n; i++ {
		out["item"+strconv.Itoa(i)] = map[string]int{"id": i, "price": i * 7 % 100}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

func count(w http.ResponseWriter, r *http.Request) {
	defer track()()
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	counts := map[string]int{}
	for _, word := range strings.Fields(string(body)) {
		counts[strings.ToLower(word)]++
	}
	type kv struct {
		Word  string `json:"word"`
		Count int    `json:"count"`
	}
	top := make([]kv, 0, len(counts))
	for k, v := range counts {
		top = append(top, kv{k, v})
	}
	sort.Slice(top, func(i, j int) bool {
		return top[i].Count > top[j].Count || top[i].Count == top[j].Count && top[i].Word < top[j].Word
	})
	if len(top) > 5 {
		top = top[:5]
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"distinct": len(counts), "top": top})
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/items", items)
	mux.HandleFunc("/count", count)
	mux.HandleFunc("/served", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, served.Load())
	})
	fmt.Printf("listening on %s\n", ln.Addr())
	os.Stdout.Sync()
	if err := http.Serve(ln, mux); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
