//go:build !go1.23

// Before Go 1.23 there is no range-over-func loop: no rangefunc scenario (see rangefunc.go).

package main
