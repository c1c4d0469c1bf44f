// openloop: an open-loop HTTP load generator (issue 18's "p99 added latency at 2,000 requests/s").
//
// wrk (the closed-loop tool the other serve benchmarks use) sends the next request when the last
// answer arrives, so it cannot hold a fixed rate and its latencies omit the queueing a slow
// server causes (coordinated omission). This sends request i at start + i/rate whatever came
// back, each on its own goroutine, and measures each latency from that intended send time, so
// a stall shows up in the percentiles of every request it delayed. Go's net/http is the client:
// not keel's code.
//
//	go run openloop.go -url http://127.0.0.1:8080/v1/chat/completions -body body.json \
//	    -rate 2000 -duration 20s -warmup 3s -conns 64
//
// Prints one line: the rate asked and achieved, counts, p50/p90/p99/p99.9/max in ms from the
// intended send time, and p50/p99 from the actual send (the generator's own lateness excluded).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"
)

func main() {
	url := flag.String("url", "", "the URL to POST to")
	bodyFile := flag.String("body", "", "a file with the request body (JSON)")
	rate := flag.Float64("rate", 2000, "requests per second")
	duration := flag.Duration("duration", 20*time.Second, "how long to measure")
	warmup := flag.Duration("warmup", 3*time.Second, "sent at the rate before measuring, not counted")
	conns := flag.Int("conns", 64, "the most connections open at once")
	timeout := flag.Duration("timeout", 10*time.Second, "per-request timeout")
	label := flag.String("label", "", "a name printed first on the result line")
	flag.Parse()
	if *url == "" || *bodyFile == "" || *rate <= 0 {
		fmt.Fprintln(os.Stderr, "openloop: -url, -body and a positive -rate are required")
		os.Exit(2)
	}
	body, err := os.ReadFile(*bodyFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(2)
	}
	client := &http.Client{
		Timeout: *timeout,
		Transport: &http.Transport{
			MaxConnsPerHost:     *conns,
			MaxIdleConnsPerHost: *conns,
			MaxIdleConns:        *conns,
			DisableCompression:  true,
		},
	}
	var (
		mu        sync.Mutex
		latencies []time.Duration
		service   []time.Duration
		errs      int
		non2xx    int
		wg        sync.WaitGroup
	)
	interval := time.Duration(float64(time.Second) / *rate)
	total := int((*warmup + *duration).Seconds() * *rate)
	warm := int(warmup.Seconds() * *rate)
	start := time.Now()
	for i := 0; i < total; i++ {
		intended := start.Add(time.Duration(i) * interval)
		if d := time.Until(intended); d > 0 {
			time.Sleep(d)
		}
		wg.Add(1)
		go func(i int, intended time.Time) {
			defer wg.Done()
			sent := time.Now()
			req, _ := http.NewRequest("POST", *url, bytes.NewReader(body))
			req.Header.Set("content-type", "application/json")
			req.Header.Set("authorization", "Bearer openloop")
			res, err := client.Do(req)
			ok := err == nil
			status := 0
			if ok {
				_, err = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				status = res.StatusCode
				ok = err == nil
			}
			lat := time.Since(intended)
			svc := time.Since(sent)
			if i < warm {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case !ok:
				errs++
			case status < 200 || status > 299:
				non2xx++
			default:
				latencies = append(latencies, lat)
				service = append(service, svc)
			}
		}(i, intended)
	}
	sendEnd := time.Since(start)
	wg.Wait()
	sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
	sort.Slice(service, func(a, b int) bool { return service[a] < service[b] })
	at := func(v []time.Duration, p float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return float64(v[int(p*float64(len(v)-1))].Microseconds()) / 1000
	}
	pct := func(p float64) float64 { return at(latencies, p) }
	achieved := float64(total) / sendEnd.Seconds()
	fmt.Printf("%s rate %.0f/s (sent at %.0f/s) measured %d ok %d errors %d non-2xx %d "+
		"p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f max %.3f ms (from send: p50 %.3f p99 %.3f ms)\n",
		*label, *rate, achieved, total-warm, len(latencies), errs, non2xx,
		pct(0.50), pct(0.90), pct(0.99), pct(0.999), pct(1.0), at(service, 0.50), at(service, 0.99))
}
