// kubeyaml reads a YAML (or JSON) stream on stdin exactly as kubectl does and prints what kubectl
// would send to the API server: one JSON line per document, {"json": <object>} or {"error": "..."}.
//
// kubectl (k8s.io/cli-runtime's StreamVisitor) decodes manifests with apimachinery's
// NewYAMLOrJSONDecoder into a json.Unmarshaler (runtime.RawExtension), which splits the stream on
// "---" lines and converts each document with sigs.k8s.io/yaml (go.yaml.in/yaml/v2 underneath, so
// YAML 1.1 booleans but no sexagesimal numbers). Empty and null documents are skipped, as kubectl does.
// Built by scripts/build-upstream.sh kubeyaml; used by tests/webhook/test_webhook_kubectl_yaml.py.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/util/yaml"
)

func main() {
	decoder := yaml.NewYAMLOrJSONDecoder(bufio.NewReader(os.Stdin), 4096)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	failures := 0
	for {
		var raw json.RawMessage
		err := decoder.Decode(&raw)
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			// kubectl stops here; keep going so a test sees every document (the reader has moved on).
			line, _ := json.Marshal(map[string]string{"error": err.Error()})
			fmt.Fprintf(out, "%s\n", line)
			failures++
			if failures > 1000 {
				return
			}
			continue
		}
		raw = bytes.TrimSpace(raw)
		if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
			continue
		}
		fmt.Fprintf(out, "{\"json\":%s}\n", raw)
	}
}
