// benchbig is the attach-latency target of `cargo xtask bench` (BENCHMARKS.md): a large Go
// binary (over 40 MB with DWARF) that links in much of the standard library. A lookup of a
// method by a name only known at run time (reflect.Value.MethodByName) keeps every exported
// method of every reachable type, as real programs using text/template or similar do. It
// then runs a small loop with maps, allocations and defers until killed, so a tracer has
// something to attach to.
package main

import (
	"archive/tar"
	"archive/zip"
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/flate"
	"compress/gzip"
	"compress/lzw"
	"compress/zlib"
	"container/heap"
	"container/list"
	"container/ring"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/des"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/rc4"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"debug/buildinfo"
	"debug/dwarf"
	"debug/elf"
	"debug/gosym"
	"debug/macho"
	"debug/pe"
	"debug/plan9obj"
	"encoding/ascii85"
	"encoding/asn1"
	"encoding/base32"
	"encoding/base64"
	"encoding/binary"
	"encoding/csv"
	"encoding/gob"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"expvar"
	"flag"
	"fmt"
	"go/ast"
	"go/build"
	"go/constant"
	"go/doc"
	"go/format"
	"go/importer"
	"go/parser"
	"go/printer"
	"go/scanner"
	"go/token"
	"go/types"
	"hash/adler32"
	"hash/crc32"
	"hash/crc64"
	"hash/fnv"
	"html"
	htmltemplate "html/template"
	"image"
	"image/color/palette"
	"image/draw"
	"image/gif"
	"image/jpeg"
	"image/png"
	"index/suffixarray"
	"io"
	"log"
	"log/slog"
	"math/big"
	"math/cmplx"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/http/httputil"
	"net/http/pprof"
	"net/mail"
	"net/rpc"
	"net/rpc/jsonrpc"
	"net/smtp"
	"net/textproto"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing/fstest"
	"text/tabwriter"
	"text/template"
	"time"
	"unicode/utf16"
)

// Everything the program can reach, so the linker keeps it.
var reachable = []any{
	tar.NewReader, zip.NewReader, bufio.NewReader, bytes.NewBuffer, bzip2.NewReader,
	flate.NewWriter, gzip.NewWriter, lzw.NewReader, zlib.NewWriter, heap.Init, list.New,
	ring.New, context.Background, aes.NewCipher, cipher.NewGCM, des.NewCipher, ecdh.P256,
	ecdsa.GenerateKey, ed25519.GenerateKey, elliptic.P384, hmac.New, md5.New, rand.Reader,
	rc4.NewCipher, rsa.GenerateKey, sha1.New, sha256.New, sha512.New, tls.Dial,
	x509.ParseCertificate, sql.Open, buildinfo.ReadFile, dwarf.New, elf.Open, gosym.NewTable,
	macho.Open, pe.Open, plan9obj.Open, ascii85.NewEncoder, asn1.Marshal, base32.NewEncoder,
	base64.NewEncoder, binary.Write, csv.NewReader, gob.NewEncoder, hex.Dump, json.Marshal,
	pem.Decode, xml.Marshal, expvar.NewMap, flag.NewFlagSet, ast.Print, build.Import,
	constant.MakeInt64, doc.New, format.Source, importer.Default, parser.ParseFile,
	printer.Fprint, scanner.PrintError, token.NewFileSet, types.NewPackage, types.Eval,
	adler32.New, crc32.NewIEEE, crc64.New, fnv.New64a, html.EscapeString, htmltemplate.New,
	image.NewRGBA, palette.Plan9, draw.Draw, gif.Decode, jpeg.Decode, png.Decode,
	suffixarray.New, io.Copy, log.New, slog.New, big.NewInt, cmplx.Sqrt, mime.TypeByExtension,
	multipart.NewReader, quotedprintable.NewReader, net.Dial, http.ListenAndServe,
	cookiejar.New, httptest.NewServer, httputil.DumpRequest, pprof.Index, mail.ParseAddress,
	rpc.NewServer, jsonrpc.NewClient, smtp.SendMail, textproto.NewReader, url.Parse, os.Open,
	exec.Command, signal.Notify, user.Current, filepath.Walk, regexp.MustCompile, sort.Strings,
	strconv.Quote, strings.NewReplacer, tabwriter.NewWriter, template.New, utf16.Encode,
	fstest.TestFS,
}

// Values of many types in interfaces: with a run-time method name, their exported methods
// (and everything those reach) stay linked.
var values = []any{
	&http.Server{}, &http.Client{}, &http.Transport{}, &http.Request{}, &http.Cookie{},
	&tls.Config{}, &tls.Conn{}, &x509.Certificate{}, &x509.CertPool{}, &rsa.PrivateKey{},
	&ecdsa.PrivateKey{}, &big.Int{}, &big.Float{}, &big.Rat{}, &sql.DB{}, &sql.Tx{},
	&elf.File{}, &macho.File{}, &pe.File{}, &dwarf.Data{}, &gosym.Table{}, &gob.Encoder{},
	&gob.Decoder{}, &xml.Decoder{}, &xml.Encoder{}, &json.Decoder{}, &json.Encoder{},
	&csv.Reader{}, &csv.Writer{}, &image.RGBA{}, &image.NRGBA{}, &image.YCbCr{},
	&image.Paletted{}, &gif.GIF{}, &zip.Reader{}, &zip.Writer{}, &tar.Reader{}, &tar.Writer{},
	&regexp.Regexp{}, &template.Template{}, &htmltemplate.Template{}, &types.Config{},
	&types.Info{}, &types.Package{}, &types.Scope{}, &types.Checker{}, &ast.File{},
	&ast.CommentMap{}, &token.FileSet{}, &build.Context{}, &doc.Package{}, &printer.Config{},
	&scanner.Scanner{}, &slog.Logger{}, &log.Logger{}, &url.URL{}, &mail.Address{},
	&multipart.Writer{}, &textproto.Reader{}, &rpc.Server{}, &exec.Cmd{}, &httputil.ReverseProxy{},
	&httptest.ResponseRecorder{}, &cookiejar.Jar{}, &tabwriter.Writer{}, &suffixarray.Index{},
	&list.List{}, &ring.Ring{}, &bytes.Buffer{}, &bufio.Reader{}, &strings.Builder{},
	&expvar.Map{}, &flag.FlagSet{}, &net.Dialer{}, &net.Resolver{}, &sync.WaitGroup{},
	&os.File{}, &os.Process{}, &time.Timer{}, &asn1.ObjectIdentifier{}, &fstest.MapFS{},
}

// Generated code (`cargo xtask bench` adds a file of generated functions here, to bring the
// binary over 40 MB) registers itself in init.
var extra []any

var (
	sink []map[string]int
	done atomic.Int64
)

//go:noinline
func work(i int) {
	for j := 0; j < 2; j++ {
		defer func(k int) { done.Add(int64(k)) }(j)
	}
	m := map[string]int{"a": i}
	m["b"] = i + 1
	sink = append(sink[:0], m)
}

func main() {
	name := "Method" + strconv.Itoa(len(os.Args))
	for _, r := range append(reachable, values...) {
		// A method name known only at run time: every exported method stays linked.
		if m := reflect.ValueOf(r).MethodByName(name); m.IsValid() {
			fmt.Println(m)
		}
	}
	fmt.Printf("ready pid %d, %d values and %d generated tables linked, %s\n", os.Getpid(),
		len(reachable)+len(values), len(extra), runtime.Version())
	os.Stdout.Sync()
	for i := 0; ; i++ {
		work(i)
		time.Sleep(10 * time.Millisecond)
	}
}
