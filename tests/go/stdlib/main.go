// stdlib links most of the standard library (a reference to one function of each package
// keeps it), so that inspect's heap-defer sites can be checked against the compiler's own
// list (`go build -gcflags=all=-d=defer`) over real library code, and holds two loop defers
// of its own. It runs nothing: it prints how many functions it keeps and exits.
package main

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/csv"
	"encoding/json"
	"encoding/xml"
	"expvar"
	"flag"
	"fmt"
	"go/parser"
	"go/token"
	"html/template"
	"image/png"
	"log"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/rpc"
	"net/smtp"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/pprof"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

var keep = []any{
	tar.NewReader, zip.NewReader, bufio.NewScanner, gzip.NewReader, context.WithCancel,
	tls.Dial, x509.ParseCertificate, sql.Open, csv.NewReader, json.Marshal, xml.Marshal,
	expvar.Publish, flag.Parse, fmt.Sprintf, parser.ParseFile, token.NewFileSet, template.New,
	png.Decode, log.New, multipart.NewReader, net.Dial, http.ListenAndServe, httptest.NewServer,
	rpc.Dial, smtp.Dial, os.Open, exec.Command, filepath.Walk, regexp.MustCompile,
	pprof.StartCPUProfile, sort.Strings, strings.NewReader, tabwriter.NewWriter, time.Now,
}

var mu sync.Mutex

// lockEach defers an unlock per round: a heap defer through a method value.
//
//go:noinline
func lockEach(rounds int) {
	for i := 0; i < rounds; i++ {
		mu.Lock()
		defer mu.Unlock()
	}
}

// closeEach defers a closure capturing a file per name.
//
//go:noinline
func closeEach(names []string) {
	for _, name := range names {
		f, err := os.Open(name)
		if err != nil {
			continue
		}
		defer func() { f.Close() }()
	}
}

func main() {
	lockEach(0)
	closeEach(nil)
	fmt.Println(len(keep))
}
