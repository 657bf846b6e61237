defmodule Quichex.Stream do
  @moduledoc """
  A QUIC stream is a process. Its pid is the handle every function here
  takes. The process is linked to its connection and has exactly one owner:

    * for a stream you open with `Quichex.Connection.open_stream/3`, you;
    * for a stream the peer opens, the connection's controlling process
      (with a `Quichex.Handler`, the stream's own process runs the handler).
      The owner's first message about it is
      `{:quic_stream_opened, conn, stream, :bidirectional | :unidirectional}`.

  Every message about a stream comes from that stream's process, so they
  arrive in order and only at the owner.

  ## Receiving

  Like `:gen_tcp`, a stream is passive (`active: false`) or active. Streams
  are active by default (`active: true`) when their connection is (the
  default); `Quichex.Connection.open_stream/3`'s `:active` option, or the
  connection's `:stream_opts` for streams the peer opens, choose otherwise.

    * `active: false` - read with `recv/2`.
    * `active: :once` - the next chunk arrives as a message, then the stream
      turns passive again; `setopts(stream, active: :once)` re-arms it.
    * `active: n` (a positive integer) - `n` chunks arrive as messages, then
      `{:quic_stream_passive, conn, stream}` and the stream turns passive.
    * `active: true` - every chunk arrives as a message as soon as it is
      read. This trades flow control away: data moves into your mailbox as
      fast as the peer sends it. Prefer `:once` or `n` for untrusted peers.

  In every mode but `true` a stream holds at most about 256 KB its owner
  has not taken; beyond that QUIC flow control slows the peer.

  Active messages:

    * `{:quic_stream, conn, stream, data}` - a chunk of data
    * `{:quic_stream_fin, conn, stream}` - the peer finished the stream
    * `{:quic_stream_reset, conn, stream, error_code}` - the peer reset it (RESET_STREAM)
    * `{:quic_stream_passive, conn, stream}` - an `active: n` count ran out

  Sent to the owner in every mode:

    * `{:quic_stream_stopped, conn, stream, error_code}` - the peer asked us
      to stop sending (STOP_SENDING); later sends return
      `{:error, {:stopped, code}}`. Receiving goes on.
    * `{:quic_stream_closed, conn, stream, reason}` - the connection ended
      (`reason` as in `{:quic_connection_closed, ...}`, or
      `{:connection_down, exit_reason}` if its process died) before the
      stream finished.

  ## The lifecycle contract

  For one stream the owner receives, in this order: the opened notice (peer
  streams only), data chunks, then **exactly one** of `{:quic_stream_fin,
  ...}`, `{:quic_stream_reset, ...}` or `{:quic_stream_closed, ...}`
  (nothing, if the owner itself shut the receiving side with `shutdown/3`).
  `{:quic_stream_stopped, ...}` may come at any point.

  The end of the stream is delivered like data: after every chunk before
  it, and only while the stream is active. With `active: :once` the FIN
  notice waits for the next `setopts(stream, active: :once)`, so a
  `:gen_tcp`-style loop that re-arms after each chunk always finds the
  stream alive when it re-arms. With `active: n` it waits for the re-arm
  after `{:quic_stream_passive, ...}`. In passive mode `recv/2` returns the
  last data with `fin? = true` (or `{:ok, "", true}` after the data), or
  `{:error, {:reset, code}}`.

  A stream **ends** when both directions are done: the end of the receiving
  side was delivered to the owner (or the owner shut it down), and the
  sending side finished (`send/3` with `fin: true` or `close/1` returned
  `:ok`, the peer stopped it, or `shutdown/3` reset it). A unidirectional
  stream has one direction. The process then exits and every function
  returns `{:error, :closed}`. Before that, every function answers:

    * `send/3` - `:ok`, or `{:error, :finished}` after our FIN,
      `{:error, {:stopped, code}}` after the peer's STOP_SENDING,
      `{:error, :closed}` after `shutdown/3` of the sending side (or on a
      stream we can only receive on), `{:error, :timeout}`;
    * `recv/2` - data, or `{:error, :closed}` once the end was returned,
      `{:error, :active}` in an active mode;
    * `setopts/2`, `shutdown/3`, `info/1` - `:ok` / `{:ok, info}`.

  The owner therefore always gets every message before the stream's
  functions start answering `{:error, :closed}`. When the connection ends
  first, the stream process ends with it.

  ## Sending

  `send/3` returns once quiche has accepted every byte, waiting while flow
  or congestion control blocks. It never drops bytes: `:ok` is a promise
  that the bytes (and the FIN, with `fin: true`) are delivered as long as
  the connection lives, also if the caller exits right after. Otherwise it
  returns `{:error, reason}` saying why. After `{:error, :timeout}` a prefix
  of the data may have been sent; the stream stays usable.

  ## Arguments and errors

  Every function takes the stream's pid. Given anything else it raises
  `ArgumentError`, as it does for a bad option (naming the option). Given
  a pid that is not a stream (a connection, a listener, the caller itself)
  it returns `{:error, :not_a_stream}` and the process is left alone; given
  a stream that has ended, `{:error, :closed}`.

  A `:timeout` is #{Quichex.Config.Schema.timeout_doc()}; anything else
  raises `ArgumentError`.

  ## Owner exit

  When the owner exits, what is still open is aborted with error code
  `#{0x0101}` (`owner_down_error_code/0`): RESET_STREAM for a sending side
  that has not finished (a stream whose FIN was accepted keeps delivering),
  STOP_SENDING for a receiving side whose peer has not finished.

  ## Example

      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: false)
      :ok = Quichex.Stream.send(stream, "ping", fin: true)
      {:ok, "pong", true} = Quichex.Stream.recv(stream, length: 0, timeout: 5_000)

  The same with a `:gen_tcp`-style loop:

      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional, active: :once)
      :ok = Quichex.Stream.send(stream, "ping", fin: true)

      loop = fn loop, acc ->
        receive do
          {:quic_stream, _conn, ^stream, data} ->
            :ok = Quichex.Stream.setopts(stream, active: :once)
            loop.(loop, [acc | data])

          {:quic_stream_fin, _conn, ^stream} ->
            IO.iodata_to_binary(acc)
        end
      end

      "pong" = loop.(loop, [])
  """

  alias Quichex.Config.Schema
  alias Quichex.Stream.Server

  @type t :: pid()
  @type active :: boolean() | :once | pos_integer()

  @default_urgency 3
  # What a call waits beyond a timeout the stream enforces itself.
  @grace 1_000

  ## Public API

  @doc """
  The error code used to abort a stream whose owner exited: `#{0x0101}`.

      iex> Quichex.Stream.owner_down_error_code()
      257
  """
  @spec owner_down_error_code() :: non_neg_integer()
  def owner_down_error_code, do: Server.owner_down_code()

  @doc """
  Sends `data` (iodata). Options: `fin: true` finishes the stream after it,
  `timeout:` how long to wait for flow control (default 5000 ms).

  Returns `:ok` once quiche took every byte (and the FIN), or
  `{:error, reason}`: `:finished` (our FIN was sent), `{:stopped, code}`
  (the peer's STOP_SENDING), `:closed` (the sending side was reset, the
  stream cannot send, or it ended), `:timeout`, `:not_a_stream`.

      :ok = Quichex.Stream.send(stream, ["hello", " ", "world"], fin: false, timeout: 5_000)
  """
  @spec send(t(), iodata(), keyword()) :: :ok | {:error, term()}
  def send(stream, data, opts \\ []) do
    opts = Schema.validate_keyword!(opts, fin: false, timeout: 5_000)
    Schema.validate!(:fin, :boolean, opts[:fin])
    Schema.validate!(:timeout, :timeout, opts[:timeout])
    bin = iodata!(data)
    request = {:send, bin, opts[:fin], opts[:timeout]}

    case own(stream) do
      {conn, id} ->
        Quichex.Connection.call(
          conn,
          {:stream_send, id, bin, opts[:fin], opts[:timeout]},
          opts[:timeout],
          @grace
        )

      nil ->
        call(stream, request, opts[:timeout])
    end
  end

  defp iodata!(data) do
    IO.iodata_to_binary(data)
  rescue
    ArgumentError ->
      reraise ArgumentError,
              "Quichex.Stream.send/3 expects iodata, got: #{inspect(data, limit: 5)}",
              __STACKTRACE__
  end

  @doc """
  Finishes the sending side: sends FIN after all data before it, in the
  same driver pass. Returns `:ok` once quiche took the FIN, or the errors
  of `send/3`. Option: `timeout:` (default 5000 ms).

      :ok = Quichex.Stream.close(stream)
  """
  @spec close(t(), keyword()) :: :ok | {:error, term()}
  def close(stream, opts \\ []) do
    opts = Schema.validate_keyword!(opts, timeout: 5_000)
    send(stream, "", fin: true, timeout: opts[:timeout])
  end

  @doc """
  Receives data in passive mode. `length: 0` (default) returns whatever is
  available (waiting for at least one byte or the end of the stream);
  `length: n` waits for exactly `n` bytes, or fewer when the stream ends
  first.

  Returns `{:ok, data, fin?}` where `fin?` means the peer finished the stream
  after `data`; `{:error, {:reset, code}}`, `{:error, :closed}`,
  `{:error, :timeout}` (after `timeout:`, default 5000 ms), `{:error, :busy}`
  (another recv/2 is waiting), `{:error, :active}` (the stream is in an
  active mode) or `{:error, :not_a_stream}`.

      {:ok, data, false} = Quichex.Stream.recv(stream, length: 0, timeout: 5_000)
  """
  @spec recv(t(), keyword()) :: {:ok, binary(), boolean()} | {:error, term()}
  def recv(stream, opts \\ []) do
    opts = Schema.validate_keyword!(opts, length: 0, timeout: 5_000)
    Schema.validate!(:length, :non_neg_integer, opts[:length])
    Schema.validate!(:timeout, :timeout, opts[:timeout])

    case own(stream) do
      nil -> call(stream, {:recv, opts[:length], opts[:timeout]}, opts[:timeout])
      _handler -> {:error, :active}
    end
  end

  @doc """
  Sets options. Only `:active` (`true | false | :once | n`); without it
  nothing changes. Returns `:ok`, or `{:error, :handler}` for a stream a
  `Quichex.Handler` serves, `{:error, :closed}`, `{:error, :not_a_stream}`.

      :ok = Quichex.Stream.setopts(stream, active: :once)
  """
  @spec setopts(t(), keyword()) :: :ok | {:error, term()}
  def setopts(stream, opts) do
    opts = Schema.validate_keyword!(opts, [:active])
    active = Keyword.get(opts, :active)
    if active != nil, do: validate_active!(active)

    case own(stream) do
      nil -> call(stream, {:setopts, active}, 5_000)
      _handler when active == nil -> :ok
      _handler -> {:error, :handler}
    end
  end

  @doc """
  Aborts one or both directions with an application `error_code`:
  `:read` sends STOP_SENDING, `:write` sends RESET_STREAM, `:both` both.
  Directions already finished are left alone. Returns `:ok`,
  `{:error, :closed}` or `{:error, :not_a_stream}`.

      :ok = Quichex.Stream.shutdown(stream, :write, error_code: 42)
  """
  @spec shutdown(t(), :read | :write | :both, keyword()) :: :ok | {:error, term()}
  def shutdown(stream, how, opts \\ [])

  def shutdown(stream, how, opts) when how in [:read, :write, :both] do
    opts = Schema.validate_keyword!(opts, error_code: 0)
    code = opts[:error_code]
    Schema.validate!(:error_code, :varint, code)

    case own(stream) do
      {conn, id} ->
        dirs = if how == :both, do: [:read, :write], else: [how]
        :gen_statem.cast(conn, {:stream, {:shutdown, id, dirs, code}})
        Kernel.send(self(), {:quichex_self, {:shutdown, dirs}})
        :ok

      nil ->
        call(stream, {:shutdown, how, code}, 5_000)
    end
  end

  def shutdown(_stream, how, _opts) do
    raise ArgumentError,
          "invalid direction: expected :read, :write or :both, got: #{inspect(how)}"
  end

  @doc """
  Sets the stream's priority (RFC 9218): `urgency` 0..7 (lower is sent
  first; default #{@default_urgency}) and `incremental` (default `true`:
  streams of equal urgency share the connection; `false` sends them one
  after the other). Returns `:ok`, `{:error, :closed}` or
  `{:error, :not_a_stream}`.

      :ok = Quichex.Stream.set_priority(stream, urgency: 0, incremental: false)
  """
  @spec set_priority(t(), keyword()) :: :ok | {:error, term()}
  def set_priority(stream, opts) do
    {urgency, incremental} = priority!(opts)

    case own(stream) do
      {conn, id} ->
        :gen_statem.cast(conn, {:stream, {:priority, id, urgency, incremental}})
        :ok

      nil ->
        call(stream, {:set_priority, urgency, incremental}, 5_000)
    end
  end

  @doc """
  Makes `pid` the owner. Only the current owner may call it
  (`{:error, :not_owner}`); `pid` must be alive (`{:error, :dead_owner}`,
  and nothing changes; a pid on another node must be on a connected node).
  A handler may hand its stream to another process this way; the handler's
  callbacks then stop. Also `{:error, :closed}`, `{:error, :not_a_stream}`.

      :ok = Quichex.Stream.controlling_process(stream, pid)
  """
  @spec controlling_process(t(), pid()) :: :ok | {:error, term()}
  def controlling_process(stream, pid) when is_pid(pid) do
    case own(stream) do
      {_conn, _id} ->
        if Quichex.Call.alive?(pid) do
          Kernel.send(self(), {:quichex_self, {:controlling_process, pid}})
          :ok
        else
          {:error, :dead_owner}
        end

      nil ->
        call(stream, {:controlling_process, self(), pid}, 5_000)
    end
  end

  @doc """
  Returns `{:ok, %{id: id, direction: dir, initiator: :local | :remote,
  connection: conn, owner: pid}}`, `{:error, :closed}` or
  `{:error, :not_a_stream}` (for a connection, say).

      {:ok, %{id: 0, direction: :bidirectional}} = Quichex.Stream.info(stream)
  """
  @spec info(t()) :: {:ok, map()} | {:error, term()}
  def info(stream) do
    case own(stream) do
      {conn, id} ->
        {^conn, ^id, direction, initiator} = Process.get(:quichex_stream)

        {:ok,
         %{id: id, direction: direction, initiator: initiator, connection: conn, owner: self()}}

      nil ->
        call(stream, :info, 5_000)
    end
  end

  @doc false
  # Whether data or the end of the stream waits to be received (for
  # Quichex.Connection.readable_streams/2).
  def readable?(stream) do
    case own(stream) do
      nil -> call(stream, :readable?, 5_000) == true
      _handler -> false
    end
  end

  @doc false
  def validate_active!(active) do
    Schema.validate!(:active, {:or, [:boolean, {:in, [:once]}, :pos_integer]}, active)
  end

  @doc false
  # `[urgency: 0..7, incremental: boolean]` to `{urgency, incremental}`.
  def priority!(opts) do
    opts = Schema.validate_keyword!(opts, urgency: @default_urgency, incremental: true)
    Schema.validate!(:urgency, {:integer, 0, 7}, opts[:urgency])
    Schema.validate!(:incremental, :boolean, opts[:incremental])
    {opts[:urgency], opts[:incremental]}
  end

  # Inside a handler callback the stream is our own process: its requests go
  # straight to the connection (a call to ourselves would deadlock).
  defp own(stream) when stream == self() do
    case Process.get(:quichex_stream) do
      {conn, id, _direction, _initiator} -> {conn, id}
      nil -> nil
    end
  end

  defp own(stream) when is_pid(stream), do: nil

  defp own(stream),
    do: raise(ArgumentError, "expected a stream pid, got: #{inspect(stream)}")

  # Calls never hang on a dead stream nor harm a process that is not one
  # (Quichex.Call); stream requests are tagged so that no other kind of
  # process takes them for its own. The stream enforces `timeout` itself and
  # answers; the extra second only covers a stream that cannot answer.
  defp call(stream, request, timeout) do
    call_timeout = if timeout == :infinity, do: :infinity, else: timeout + @grace
    Quichex.Call.call(stream, {:quichex_stream, request}, call_timeout, :not_a_stream)
  end
end
