# shellcheck shell=bash
# What the footprint benchmarks (supervisor.sh, reconcile.sh) read of a process, from
# /proc; sourced by both. Memory in kB, CPU in clock ticks (utime + stime, children
# excluded). cpu_percent and ratio format the figures the benchmarks print.
hz=$(getconf CLK_TCK)
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss()   { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
pss()   { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup"; }
anon()  { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status"; }
file()  { awk '/^RssFile:/ { print $2 }' "/proc/$1/status"; }
# cpu_percent TICKS SECONDS: TICKS over SECONDS as a percentage of one core.
cpu_percent() { awk -v d="$1" -v hz="$hz" -v t="$2" 'BEGIN { printf "%.3f", d / hz / t * 100 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
