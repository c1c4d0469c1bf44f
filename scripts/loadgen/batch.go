// batch: a plain Go batch client, the baseline for issue 18's "the batch path's CPU cost"
// target: what `keel batch` does, without keel's policy — read JSONL items ({"id", "prompt"}),
// POST each as an OpenAI chat completion with -c workers on net/http (one keep-alive
// connection per worker), write one JSONL result per item ({"id", "status", "text"} or
// {"id", "status": "failed", "error"}). No retries: against a server with no faults every
// item is answered once, as with keel.
//
//	go build -o batch batch.go
//	/usr/bin/time -f '%e s wall %U user %S sys' ./batch -url http://127.0.0.1:P -in prompts.jsonl \
//	    -out results.jsonl -c 64
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"
)

type item struct {
	ID     json.RawMessage `json:"id"`
	Prompt string          `json:"prompt"`
}

type result struct {
	ID     json.RawMessage `json:"id"`
	Status string          `json:"status"`
	Text   string          `json:"text,omitempty"`
	Error  string          `json:"error,omitempty"`
	// Seconds from the moment a worker took the item to its answer (as keel's "seconds").
	Seconds float64 `json:"seconds"`
}

func main() {
	base := flag.String("url", "", "the server's base URL (…/v1/chat/completions is added)")
	in := flag.String("in", "", "JSONL input")
	out := flag.String("out", "", "JSONL output")
	workers := flag.Int("c", 64, "concurrency")
	model := flag.String("model", "m", "the model to ask")
	ca := flag.String("ca", "", "PEM CA file to trust for an https:// -url (scripts/bench-tls.sh)")
	flag.Parse()
	f, err := os.Open(*in)
	if err != nil {
		fmt.Fprintln(os.Stderr, "batch:", err)
		os.Exit(2)
	}
	defer f.Close()
	w, err := os.Create(*out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "batch:", err)
		os.Exit(2)
	}
	defer w.Close()
	transport := &http.Transport{
		MaxIdleConnsPerHost: *workers,
		MaxConnsPerHost:     *workers,
		MaxIdleConns:        *workers,
	}
	if *ca != "" {
		pem, err := os.ReadFile(*ca)
		if err != nil {
			fmt.Fprintln(os.Stderr, "batch:", err)
			os.Exit(2)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fmt.Fprintln(os.Stderr, "batch: no certificate in", *ca)
			os.Exit(2)
		}
		// HTTP/1.1 over TLS, as keel speaks (a custom TLS config turns HTTP/2 off).
		transport.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	client := &http.Client{
		Timeout:   60 * time.Second,
		Transport: transport,
	}
	url := *base + "/v1/chat/completions"
	items := make(chan item, *workers)
	var mu sync.Mutex
	bw := bufio.NewWriter(w)
	write := func(r result) {
		line, _ := json.Marshal(r)
		mu.Lock()
		bw.Write(line)
		bw.WriteByte('\n')
		mu.Unlock()
	}
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range items {
				took := time.Now()
				body, _ := json.Marshal(map[string]any{
					"model":      *model,
					"max_tokens": 1024,
					"messages":   []map[string]string{{"role": "user", "content": it.Prompt}},
				})
				res, err := client.Post(url, "application/json", bytes.NewReader(body))
				if err != nil {
					write(result{ID: it.ID, Status: "failed", Error: err.Error(), Seconds: time.Since(took).Seconds()})
					continue
				}
				data, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil || res.StatusCode != 200 {
					write(result{ID: it.ID, Status: "failed", Error: fmt.Sprintf("HTTP %d", res.StatusCode), Seconds: time.Since(took).Seconds()})
					continue
				}
				var c struct {
					Choices []struct {
						Message struct {
							Content string `json:"content"`
						} `json:"message"`
					} `json:"choices"`
				}
				if err := json.Unmarshal(data, &c); err != nil || len(c.Choices) == 0 {
					write(result{ID: it.ID, Status: "failed", Error: "malformed answer", Seconds: time.Since(took).Seconds()})
					continue
				}
				write(result{ID: it.ID, Status: "ok", Text: c.Choices[0].Message.Content, Seconds: time.Since(took).Seconds()})
			}
		}()
	}
	scan := bufio.NewScanner(f)
	scan.Buffer(make([]byte, 1<<20), 16<<20)
	n := 0
	for scan.Scan() {
		var it item
		if err := json.Unmarshal(scan.Bytes(), &it); err != nil {
			fmt.Fprintln(os.Stderr, "batch: bad line:", err)
			os.Exit(2)
		}
		items <- it
		n++
	}
	close(items)
	wg.Wait()
	bw.Flush()
	fmt.Fprintf(os.Stderr, "batch: %d items in %.3f s\n", n, time.Since(start).Seconds())
}
