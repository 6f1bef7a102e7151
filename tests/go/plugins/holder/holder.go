// holder is a Go plugin (go build -buildmode=plugin) for tests/go/plugins/host: code whose
// defers are registered by the plugin's own copy of the runtime's defer functions, which a
// tracer of the host executable alone does not see. (No main.go here: `cargo xtask
// go-programs` builds programs, not plugins; the e2e test builds this with cgo on.)
package main

// Hold registers n heap defers in its frame (a defer in a loop), reports on ready, and blocks
// until release is closed.
//
//go:noinline
func Hold(n int, ready chan<- struct{}, release <-chan struct{}) {
	ran := 0
	for i := 0; i < n; i++ {
		defer func() { ran++ }()
	}
	ready <- struct{}{}
	<-release
}

// Churn registers n heap defers in its frame and returns: they all run through the plugin's
// deferreturn. Returns how many ran.
//
//go:noinline
func Churn(n int) (ran int) {
	churn(n, &ran)
	return ran
}

//go:noinline
func churn(n int, ran *int) {
	for i := 0; i < n; i++ {
		defer func() { *ran++ }()
	}
}
