// Command thriftcall calls the example Calculator service (IDL/examples/calculator.thrift) on a Thrift port with
// Apache Thrift's Go library, the way a Go service calls another, and prints one line per check:
//
//	ok <check> <detail>
//	FAIL <check>: <reason>
//
// It exits 0 when every check passed, 1 when one failed (or the port did not answer) and 2 on bad flags.
//
// The generated Go client (TStandardClient) compares the name of every reply with the bare method it called,
// also when a TMultiplexedProtocol wrote the call as "Service:method", and fails with WRONG_METHOD_NAME when they
// differ. Every check therefore also proves that the peer answers under the bare method name, replies,
// declared exceptions and TApplicationExceptions alike; on that failure the line says which name the reply had.
//
// Tests/Integration/test_thrift_go.py builds it in GOPATH mode against Debian's golang-thrift-dev (0.17):
//
//	GO111MODULE=off GOPATH=<repo>/Tests/Integration/go:/usr/share/gocode go build -o thriftcall apustest/thriftcall
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"apustest/gen-go/calculator"

	"github.com/apache/thrift/lib/go/thrift"
)

type options struct {
	addr           string
	transport      string
	protocol       string
	service        string
	function       string
	unknownService string
	checks         string
	zapID          int
	deadlineMs     int
	timeout        time.Duration
}

func main() {
	o := &options{}
	flag.StringVar(&o.addr, "addr", "", "host:port of the Thrift port (required)")
	flag.StringVar(&o.transport, "transport", "framed", "framed | header | buffered")
	flag.StringVar(&o.protocol, "protocol", "binary", "binary | compact")
	flag.StringVar(&o.service, "service", "", "multiplexed service name (TMultiplexedProtocol); empty: plain method names")
	flag.StringVar(&o.function, "function", "", "THeader key apus-function sent with every call (-transport header only)")
	flag.StringVar(&o.unknownService, "unknown-service", "", "also check that a call to this multiplexed service name, "+
		"which nothing serves, is answered with TApplicationException UNKNOWN_METHOD")
	flag.StringVar(&o.checks, "checks", "", "comma-separated checks to run, in that order (default: every one that "+
		"applies): "+strings.Join(checkNames(), ", "))
	flag.IntVar(&o.zapID, "zap-id", 0, "id the oneway zap call sends (default: random)")
	flag.IntVar(&o.deadlineMs, "deadline-ms", 300, "THeader client_timeout (ms) of the deadline check")
	flag.DurationVar(&o.timeout, "timeout", 20*time.Second, "socket timeout and time limit of each check")
	flag.Parse()

	selected, err := o.validate()
	if err != nil {
		fmt.Fprintf(os.Stderr, "thriftcall: %v\n", err)
		flag.Usage()
		os.Exit(2)
	}
	if o.zapID == 0 {
		o.zapID = 1 + rand.New(rand.NewSource(time.Now().UnixNano())).Intn(math.MaxInt32-1)
	}
	how := "plain method names"
	if o.service != "" {
		how = fmt.Sprintf("multiplexed as %q", o.service)
	}
	fmt.Fprintf(os.Stderr, "thriftcall: %s/%s to %s, %s\n", o.transport, o.protocol, o.addr, how)

	c, err := dial(o)
	if err != nil {
		fmt.Printf("FAIL connect: %v\n", err)
		os.Exit(1)
	}
	var failed []string
	for _, ch := range selected {
		ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
		detail, err := ch.run(ctx, c)
		cancel()
		if err == nil {
			fmt.Println(strings.TrimSpace("ok " + ch.name + " " + detail))
			continue
		}
		fmt.Printf("FAIL %s: %v\n", ch.name, err)
		failed = append(failed, ch.name)
		// The reply that failed may be half read, which would garble every later one: go on over a new connection.
		c.close()
		if c, err = dial(o); err != nil {
			fmt.Printf("FAIL reconnect: %v\n", err)
			failed = append(failed, "reconnect")
			break
		}
	}
	if c != nil {
		c.close()
	}
	if len(failed) > 0 {
		fmt.Fprintf(os.Stderr, "thriftcall: %d check(s) failed: %s\n", len(failed), strings.Join(failed, ", "))
		os.Exit(1)
	}
}

func (o *options) validate() ([]check, error) {
	if o.addr == "" {
		return nil, errors.New("-addr is required")
	}
	switch o.transport {
	case "framed", "header", "buffered":
	default:
		return nil, fmt.Errorf("-transport %q: want framed, header or buffered", o.transport)
	}
	switch o.protocol {
	case "binary", "compact":
	default:
		return nil, fmt.Errorf("-protocol %q: want binary or compact", o.protocol)
	}
	if o.function != "" && o.transport != "header" {
		return nil, errors.New("-function is a THeader key: it needs -transport header")
	}
	if o.timeout <= 0 || o.deadlineMs <= 0 || o.zapID < 0 {
		return nil, errors.New("-timeout, -deadline-ms and -zap-id must be positive")
	}
	if o.checks == "" {
		var all []check
		for _, ch := range checks {
			if ch.applies == nil || ch.applies(o) == nil {
				all = append(all, ch)
			}
		}
		return all, nil
	}
	var picked []check
	for _, name := range strings.Split(o.checks, ",") {
		ch, ok := checkNamed(strings.TrimSpace(name))
		if !ok {
			return nil, fmt.Errorf("-checks: no check %q (there are %s)", name, strings.Join(checkNames(), ", "))
		}
		if ch.applies != nil {
			if err := ch.applies(o); err != nil {
				return nil, fmt.Errorf("-checks: %s %v", ch.name, err)
			}
		}
		picked = append(picked, ch)
	}
	return picked, nil
}

// ---- the connection ----------------------------------------------------------------------------------------------

// conn is one connection with the client of the calculator on it.
type conn struct {
	o      *options
	trans  thrift.TTransport       // the outermost transport (Close flushes and closes the socket)
	header *thrift.THeaderProtocol // with -transport header
	base   thrift.TProtocol        // the protocol every client on this connection writes with, before multiplexing
	in     *recorder               // what every client on this connection reads with
	std    *thrift.TStandardClient
	calc   *calculator.CalculatorClient
}

func dial(o *options) (*conn, error) {
	cfg := &thrift.TConfiguration{ConnectTimeout: 10 * time.Second, SocketTimeout: o.timeout}
	sock := thrift.NewTSocketConf(o.addr, cfg)
	if err := sock.Open(); err != nil {
		return nil, err
	}
	c := &conn{o: o}
	switch o.transport {
	case "framed":
		c.trans = thrift.NewTFramedTransportConf(sock, cfg)
		c.base = newProtocol(c.trans, o.protocol, cfg)
	case "buffered":
		c.trans = thrift.NewTBufferedTransport(sock, 64<<10)
		c.base = newProtocol(c.trans, o.protocol, cfg)
	case "header":
		id := thrift.THeaderProtocolBinary
		if o.protocol == "compact" {
			id = thrift.THeaderProtocolCompact
		}
		hcfg := &thrift.TConfiguration{ConnectTimeout: cfg.ConnectTimeout, SocketTimeout: cfg.SocketTimeout,
			THeaderProtocolID: thrift.THeaderProtocolIDPtrMust(id)}
		c.header = thrift.NewTHeaderProtocolConf(sock, hcfg)
		c.trans = c.header.Transport()
		c.base = c.header
	}
	c.in = &recorder{TProtocol: c.base}
	c.std = thrift.NewTStandardClient(c.in, c.writer(o.service))
	c.calc = calculator.NewCalculatorClient(c.std)
	c.setHeaders(true, nil)
	return c, nil
}

func newProtocol(t thrift.TTransport, name string, cfg *thrift.TConfiguration) thrift.TProtocol {
	if name == "compact" {
		return thrift.NewTCompactProtocolConf(t, cfg)
	}
	return thrift.NewTBinaryProtocolConf(t, cfg)
}

// writer is the output protocol of a client calling service (multiplexed) or plain method names ("").
func (c *conn) writer(service string) thrift.TProtocol {
	if service != "" {
		return thrift.NewTMultiplexedProtocol(c.base, service)
	}
	return plainWriter{c.base}
}

// plainWriter hides a *THeaderProtocol from TStandardClient.Send, which would otherwise clear the THeader write
// headers before every call and set only those carried by the context. This program sets them on the protocol
// itself instead (setHeaders), which is also what works for a multiplexed client, whose protocol Send does not
// recognise as THeader either.
type plainWriter struct{ thrift.TProtocol }

// setHeaders replaces the THeader keys sent with every following call: apus-function (-function) when pin is
// set, and extra.
func (c *conn) setHeaders(pin bool, extra map[string]string) {
	if c.header == nil {
		return
	}
	c.header.ClearWriteHeaders()
	if pin && c.o.function != "" {
		c.header.SetWriteHeader("apus-function", c.o.function)
	}
	for k, v := range extra {
		c.header.SetWriteHeader(k, v)
	}
}

func (c *conn) close() {
	if c != nil && c.trans != nil {
		_ = c.trans.Close()
	}
}

// recorder remembers the last message header read, to say what a reply was called when the client refused it.
type recorder struct {
	thrift.TProtocol
	seen  bool
	name  string
	typ   thrift.TMessageType
	seqid int32
}

func (r *recorder) ReadMessageBegin(ctx context.Context) (string, thrift.TMessageType, int32, error) {
	name, typ, seqid, err := r.TProtocol.ReadMessageBegin(ctx)
	if err == nil {
		r.seen, r.name, r.typ, r.seqid = true, name, typ, seqid
	}
	return name, typ, seqid, err
}

// ---- errors ----------------------------------------------------------------------------------------------------

var appExceptionNames = map[int32]string{
	thrift.UNKNOWN_APPLICATION_EXCEPTION:  "UNKNOWN",
	thrift.UNKNOWN_METHOD:                 "UNKNOWN_METHOD",
	thrift.INVALID_MESSAGE_TYPE_EXCEPTION: "INVALID_MESSAGE_TYPE",
	thrift.WRONG_METHOD_NAME:              "WRONG_METHOD_NAME",
	thrift.BAD_SEQUENCE_ID:                "BAD_SEQUENCE_ID",
	thrift.MISSING_RESULT:                 "MISSING_RESULT",
	thrift.INTERNAL_ERROR:                 "INTERNAL_ERROR",
	thrift.PROTOCOL_ERROR:                 "PROTOCOL_ERROR",
	thrift.INVALID_TRANSFORM:              "INVALID_TRANSFORM",
	thrift.INVALID_PROTOCOL:               "INVALID_PROTOCOL",
	thrift.UNSUPPORTED_CLIENT_TYPE:        "UNSUPPORTED_CLIENT_TYPE",
}

func appExceptionName(id int32) string {
	if name, ok := appExceptionNames[id]; ok {
		return name
	}
	return fmt.Sprintf("type %d", id)
}

func messageTypeName(t thrift.TMessageType) string {
	switch t {
	case thrift.CALL:
		return "CALL"
	case thrift.REPLY:
		return "REPLY"
	case thrift.EXCEPTION:
		return "EXCEPTION"
	case thrift.ONEWAY:
		return "ONEWAY"
	}
	return fmt.Sprintf("message type %d", t)
}

// explain describes err, the failure of a call of method, for a FAIL line.
func (c *conn) explain(method string, err error) error {
	var ae thrift.TApplicationException
	if errors.As(err, &ae) {
		msg := fmt.Sprintf("%s: TApplicationException %s: %v", method, appExceptionName(ae.TypeId()), ae)
		switch ae.TypeId() {
		case thrift.WRONG_METHOD_NAME, thrift.BAD_SEQUENCE_ID, thrift.INVALID_MESSAGE_TYPE_EXCEPTION:
			if c.in.seen {
				msg += fmt.Sprintf(" (the reply read was named %q, %s, seqid %d; the call was %q)",
					c.in.name, messageTypeName(c.in.typ), c.in.seqid, method)
			}
		}
		return errors.New(msg)
	}
	var te thrift.TTransportException
	if errors.As(err, &te) {
		return fmt.Errorf("%s: transport error (%d): %v", method, te.TypeId(), err)
	}
	var pe thrift.TProtocolException
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: protocol error (%d): %v", method, pe.TypeId(), err)
	}
	return fmt.Errorf("%s: %T: %v", method, err, err)
}

// expectAppException checks that err is a TApplicationException of type want; it returns its message.
func (c *conn) expectAppException(method string, err error, want int32) (string, error) {
	if err == nil {
		return "", fmt.Errorf("%s: succeeded, expected TApplicationException %s", method, appExceptionName(want))
	}
	var ae thrift.TApplicationException
	if !errors.As(err, &ae) || ae.TypeId() != want {
		return "", fmt.Errorf("expected TApplicationException %s, got %v", appExceptionName(want), c.explain(method, err))
	}
	return ae.Error(), nil
}

// ---- checks ----------------------------------------------------------------------------------------------------

type check struct {
	name    string
	applies func(*options) error // nil: always; else why the check does not apply
	run     func(ctx context.Context, c *conn) (string, error)
}

var checks = []check{
	{name: "ping", run: checkPing},
	{name: "add", run: checkAdd},
	{name: "whoami", run: checkWhoami},
	{name: "describe", run: checkDescribe},
	{name: "sum", run: checkSum},
	{name: "histogram", run: checkHistogram},
	{name: "roundtrip", run: checkRoundtrip},
	{name: "calculate", run: checkCalculate},
	{name: "crash", run: checkCrash},
	{name: "zap", run: checkZap},
	{name: "unknown-method", run: checkUnknownMethod},
	{name: "unknown-service", applies: needsUnknownService, run: checkUnknownService},
	{name: "deadline", applies: needsHeader, run: checkDeadline},
}

func checkNames() []string {
	names := make([]string, len(checks))
	for i, ch := range checks {
		names[i] = ch.name
	}
	return names
}

func checkNamed(name string) (check, bool) {
	for _, ch := range checks {
		if ch.name == name {
			return ch, true
		}
	}
	return check{}, false
}

func needsUnknownService(o *options) error {
	if o.unknownService == "" {
		return errors.New("needs -unknown-service")
	}
	return nil
}

func needsHeader(o *options) error {
	if o.transport != "header" {
		return errors.New("needs -transport header (client_timeout is a THeader key)")
	}
	return nil
}

// add calls add(a, b) and checks the sum.
func (c *conn) add(ctx context.Context, client *calculator.CalculatorClient, a, b int32) error {
	got, err := client.Add(ctx, a, b)
	if err != nil {
		return c.explain("add", err)
	}
	if got != a+b {
		return fmt.Errorf("add(%d, %d) = %d, want %d", a, b, got, a+b)
	}
	return nil
}

func checkPing(ctx context.Context, c *conn) (string, error) {
	if err := c.calc.Ping(ctx); err != nil {
		return "", c.explain("ping", err)
	}
	return "", nil
}

func checkAdd(ctx context.Context, c *conn) (string, error) {
	if err := c.add(ctx, c.calc, 2, 3); err != nil {
		return "", err
	}
	return "5", nil
}

func checkWhoami(ctx context.Context, c *conn) (string, error) {
	who, err := c.calc.Whoami(ctx)
	if err != nil {
		return "", c.explain("whoami", err)
	}
	if !strings.Contains(who, "/") {
		return "", fmt.Errorf("whoami = %q, want <function>/<instance>", who)
	}
	return who, nil
}

func checkDescribe(ctx context.Context, c *conn) (string, error) {
	got, err := c.calc.Describe(ctx, true, math.MinInt8, math.MaxInt16, math.MinInt32, math.MaxInt64, 0.25,
		"grüße, 世界", []byte{0x00, 0xff, 0x10})
	if err != nil {
		return "", c.explain("describe", err)
	}
	// The function formats its arguments with Python's %s and %r.
	want := "flag=True tiny=-128 small=32767 medium=-2147483648 large=9223372036854775807 real=0.25 " +
		"text=grüße, 世界 blob=00ff10"
	if got != want {
		return "", fmt.Errorf("describe = %q, want %q", got, want)
	}
	return "matches", nil
}

func checkSum(ctx context.Context, c *conn) (string, error) {
	got, err := c.calc.Sum(ctx, []int64{1, 2, 3, math.MaxInt32})
	if err != nil {
		return "", c.explain("sum", err)
	}
	if want := int64(6 + math.MaxInt32); got != want {
		return "", fmt.Errorf("sum = %d, want %d", got, want)
	}
	return fmt.Sprint(got), nil
}

func checkHistogram(ctx context.Context, c *conn) (string, error) {
	got, err := c.calc.Histogram(ctx, []string{"x", "y", "x"})
	if err != nil {
		return "", c.explain("histogram", err)
	}
	if want := map[string]int32{"x": 2, "y": 1}; !reflect.DeepEqual(got, want) {
		return "", fmt.Errorf("histogram = %v, want %v", got, want)
	}
	keys := make([]string, 0, len(got))
	for k := range got {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, got[k])
	}
	return strings.Join(parts, " "), nil
}

func checkRoundtrip(ctx context.Context, c *conn) (string, error) {
	note := "a note"
	// Sets hold one element each: the function sends a set back in its own order.
	value := &calculator.AllTypes{
		Flag: true, Tiny: -5, Small: 1000, Medium: -70000, Large: 1 << 40, Real: -2.5, Text: "héllo",
		Blob: []byte{1, 2, 3, 0, 255}, Numbers: []int32{3, 1, 2}, Tags: []string{"t"},
		Counts: map[string]int64{"a": 1, "b": -2},
		Shape: &calculator.Shape{Name: "tri", Points: []*calculator.Point{{X: 0, Y: 0}, {X: 1, Y: 0}, {X: 0, Y: 1}},
			Anchors: map[string]*calculator.Point{"origin": {X: 0, Y: 0}}, Center: &calculator.Point{X: 0.5, Y: 0.5}},
		Shapes: []*calculator.Shape{{Name: "empty", Points: []*calculator.Point{},
			Anchors: map[string]*calculator.Point{}}},
		Index:  map[int32][]string{7: {"seven", "sieben"}},
		Ids:    []int64{-1},
		Matrix: map[string]map[string]bool{"r": {"c": true}},
		Grid:   [][]int16{{1, 2}, {}, {3}},
		Note:   &note,
		Op:     calculator.Operation_MULTIPLY,
	}
	got, err := c.calc.Roundtrip(ctx, value)
	if err != nil {
		return "", c.explain("roundtrip", err)
	}
	if !value.Equals(got) {
		return "", fmt.Errorf("roundtrip = %v, want %v", got, value)
	}
	return "equal", nil
}

func checkCalculate(ctx context.Context, c *conn) (string, error) {
	got, err := c.calc.Calculate(ctx, 1, &calculator.Work{Num1: 7, Num2: 6, Op: calculator.Operation_MULTIPLY})
	if err != nil {
		return "", c.explain("calculate", err)
	}
	if got != 42 {
		return "", fmt.Errorf("calculate(7 * 6) = %d, want 42", got)
	}
	_, err = c.calc.Calculate(ctx, 2, &calculator.Work{Num1: 1, Num2: 0, Op: calculator.Operation_DIVIDE})
	var ouch *calculator.InvalidOperation
	if !errors.As(err, &ouch) {
		if err == nil {
			return "", errors.New("calculate(1 / 0) succeeded, expected InvalidOperation")
		}
		return "", fmt.Errorf("calculate(1 / 0): expected InvalidOperation, got %v", c.explain("calculate", err))
	}
	if ouch.What != int32(calculator.Operation_DIVIDE) || ouch.Why != "cannot divide by 0" {
		return "", fmt.Errorf("calculate(1 / 0) raised %v, want InvalidOperation{What: 4, Why: cannot divide by 0}", ouch)
	}
	return fmt.Sprintf("%d InvalidOperation(%d, %s)", got, ouch.What, ouch.Why), nil
}

func checkCrash(ctx context.Context, c *conn) (string, error) {
	err := c.calc.Crash(ctx, "boom")
	if _, err := c.expectAppException("crash", err, thrift.INTERNAL_ERROR); err != nil {
		return "", err
	}
	return "INTERNAL_ERROR", nil
}

// checkZap sends the oneway zap, then a call whose reply must be its own and come at once (a oneway call has no
// reply). Note that Go's TStandardClient writes a oneway call with message type CALL, not ONEWAY: the callee knows
// from its IDL that no reply follows, a proxy has to find out otherwise.
func checkZap(ctx context.Context, c *conn) (string, error) {
	if err := c.calc.Zap(ctx, int32(c.o.zapID)); err != nil {
		return "", c.explain("zap", err)
	}
	start := time.Now()
	err := c.add(ctx, c.calc, 3, 4)
	took := time.Since(start).Round(time.Millisecond)
	if err != nil {
		return "", fmt.Errorf("the call after the oneway zap (answered after %v): %v", took, err)
	}
	if took > 5*time.Second {
		return "", fmt.Errorf("the call after the oneway zap was answered after %v: held behind the oneway call", took)
	}
	return fmt.Sprint(c.o.zapID), nil
}

// checkUnknownMethod calls a method the service does not have (the generated client has no such call, so it goes
// through the client's TStandardClient with ping's argument and result structs), then a call on the same
// connection.
func checkUnknownMethod(ctx context.Context, c *conn) (string, error) {
	const method = "noSuchMethod"
	_, err := c.std.Call(ctx, method, &calculator.CalculatorPingArgs{}, &calculator.CalculatorPingResult{})
	if _, err := c.expectAppException(method, err, thrift.UNKNOWN_METHOD); err != nil {
		return "", err
	}
	if err := c.add(ctx, c.calc, 5, 6); err != nil {
		return "", fmt.Errorf("after UNKNOWN_METHOD: %v", err)
	}
	return "UNKNOWN_METHOD", nil
}

// checkUnknownService calls add on a multiplexed service name nothing serves, with a second client on the same
// connection (THeader apus-function left out, so the service name is what routes), then a call of the first.
func checkUnknownService(ctx context.Context, c *conn) (string, error) {
	other := calculator.NewCalculatorClient(thrift.NewTStandardClient(c.in, c.writer(c.o.unknownService)))
	c.setHeaders(false, nil)
	_, err := other.Add(ctx, 1, 2)
	c.setHeaders(true, nil)
	message, err := c.expectAppException("add", err, thrift.UNKNOWN_METHOD)
	if err != nil {
		return "", fmt.Errorf("service %q: %v", c.o.unknownService, err)
	}
	if err := c.add(ctx, c.calc, 8, 9); err != nil {
		return "", fmt.Errorf("after UNKNOWN_METHOD: %v", err)
	}
	return "UNKNOWN_METHOD " + message, nil
}

// checkDeadline sends THeader client_timeout with a call that sleeps longer: the gateway answers with a
// TApplicationException once the deadline passed, and the instance's late reply must not reach a later call.
func checkDeadline(ctx context.Context, c *conn) (string, error) {
	const sleepMs = 3000
	deadline := time.Duration(c.o.deadlineMs) * time.Millisecond
	c.setHeaders(true, map[string]string{"client_timeout": fmt.Sprint(c.o.deadlineMs)})
	start := time.Now()
	_, err := c.calc.Slow(ctx, sleepMs)
	took := time.Since(start)
	code := c.header.GetReadHeaders()["apus-error-code"]
	c.setHeaders(true, nil)
	if _, err := c.expectAppException("slow", err, thrift.INTERNAL_ERROR); err != nil {
		return "", err
	}
	if took < deadline*8/10 || took > sleepMs*time.Millisecond*8/10 {
		return "", fmt.Errorf("the %v deadline was answered after %v", deadline, took.Round(time.Millisecond))
	}
	if code != "504" {
		return "", fmt.Errorf("reply header apus-error-code = %q, want 504", code)
	}
	if err := c.add(ctx, c.calc, 2, 3); err != nil {
		return "", fmt.Errorf("after the deadline: %v", err)
	}
	time.Sleep(time.Until(start.Add(sleepMs*time.Millisecond + 300*time.Millisecond)))
	if err := c.add(ctx, c.calc, 3, 4); err != nil {
		return "", fmt.Errorf("after the instance's late reply: %v", err)
	}
	return "INTERNAL_ERROR apus-error-code 504", nil
}
