module deferprobe.test/vmrunner

go 1.21
