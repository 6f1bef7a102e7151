module deferprobe.test/programs

go 1.21
