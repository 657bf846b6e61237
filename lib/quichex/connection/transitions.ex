defmodule Quichex.Connection.Transitions do
  @moduledoc false
  # What the connection does when its state changes: the driver pass that
  # decides it (drive/6), the handshake completes, the connection starts
  # closing, the process ends.

  alias Quichex.{Native, Telemetry}
  alias Quichex.Connection.{Datagrams, Driver, Mobility, Paths, Reports, State, UDP}

  @drain_cap_ms 3_000
  @max_timer_ms Quichex.Config.Schema.max_timeout()

  @doc """
  Whether a server refuses the client whose handshake just completed:
  `{transport_code, phrase}`, or nil. A listener with `client_cert:
  :require` refuses a client that sent no certificate (BoringSSL verifies
  one that is sent, but does not require one) with the TLS alert
  certificate_required (116).
  """
  def refusal(%State{role: :server, listener: %{client_cert: :require}} = data) do
    case Native.connection_info(data.native) do
      {:ok, %{peer_cert: nil}} -> {0x100 + 116, "certificate required"}
      _ -> nil
    end
  end

  def refusal(_data), do: nil

  @doc """
  The handshake just completed (before the pass dispatches any stream
  data): telemetry, waiters, the handler process, the owner's messages and
  the 0-RTT outcome.
  """
  def established(%State{} = data) do
    {:ok, info} = Native.connection_info(data.native)

    Telemetry.execute(
      [:quichex, :connection, :handshake],
      %{duration: System.monotonic_time() - data.started_at},
      Map.merge(Reports.telemetry_meta(data), %{
        alpn: info.alpn,
        retry: Reports.retry_used?(data, info)
      })
    )

    # The listener counts pending handshakes.
    with %{shared: shared} <- data.listener, do: Quichex.Listener.Registry.established(shared)

    Enum.each(data.waiters, &:gen_statem.reply(&1, :ok))
    data = start_handler(%{data | waiters: []})
    Reports.notify_owner(data, {:quic_connected, self()})
    data = early_data(data, info)

    case data.listener do
      %{mode: :active, pid: listener} ->
        send(data.owner, {:quic_connection, listener, self(), data.peer})

      _ ->
        :ok
    end

    data
  end

  # The outcome of 0-RTT, now that the handshake tells: in info/2, to a
  # client's owner (that tried), to a handler, and as a telemetry event.
  defp early_data(data, info) do
    outcome = Reports.early_data_outcome(data, info)

    told =
      case outcome do
        :rejected -> {:rejected, Reports.early_data_reason(info)}
        other -> other
      end

    if (data.role == :client and data.early_data) or (data.role == :server and outcome != :none) do
      Reports.notify_owner(data, {:quic_early_data, self(), told})

      reason = if outcome == :rejected, do: Reports.early_data_reason(info)
      Reports.event(data, :early_data, %{}, %{outcome: outcome, reason: reason})
    end

    %{data | early_data_outcome: outcome}
  end

  # A listener's handler: its connection process starts now, linked to us,
  # and becomes the controlling process.
  defp start_handler(%State{handler: {:connection_handler, module}} = data),
    do: %{data | runner: Quichex.ConnectionHandler.start_link(module, self(), data.peer)}

  defp start_handler(%State{handler: {:handler, module, options}, owner: nil} = data) do
    pid = Quichex.Handler.ConnectionServer.start_link(module, options, self())
    %{data | owner: pid, owner_ref: Process.monitor(pid)}
  end

  defp start_handler(data), do: data

  @doc "The handshake ran out of time: close at once, tell the owner and the streams."
  def handshake_expired(%State{} = data) do
    _ = Native.connection_close(data.native, false, 0, "handshake timeout")
    {data, _out} = Driver.flush(data)
    data = %{data | close_reason: Reports.transport_error(:handshake_timeout)}
    Reports.notify_closed(:handshaking, data)
    Driver.end_streams(%{data | waiters: []}, data.close_reason)
  end

  @doc "Entering :draining: learn why, tell the owner and the streams."
  def closing(state, %State{} = data) do
    {code, reason} = Reports.close_reason(state, data)
    data = %{data | close_code: code, close_reason: reason}
    Reports.notify_closed(state, data)
    Driver.end_streams(%{data | waiters: []}, reason)
  end

  @doc "The connection process ends (`terminate/3`): closes and releases everything it holds."
  def terminated(reason, state, %State{} = data) do
    # Stopped from outside (a listener or application shutting down) while
    # still open: tell the peer with CONNECTION_CLOSE instead of leaving it
    # to its idle timer, and end every stream.
    data =
      if state in [:handshaking, :established] do
        if Native.connection_close(data.native, true, 0, "shutdown") == :ok do
          {data, _out} = Driver.flush(data)
          data
        else
          data
        end
        |> Driver.end_streams(:shutdown)
      else
        data
      end

    # What the pacer still held goes now (the close comes last).
    data = Driver.release_paced(data, true)

    if data.owns_socket, do: UDP.close(data.socket)
    # The process is ending: the updated paths and datagram state are not
    # needed, only the closing and replying these calls do.
    _paths = Paths.close_all(data.paths)
    :ok = Mobility.unroute(data, data.cids)
    Enum.each(data.waiters, &:gen_statem.reply(&1, {:error, :closed}))
    _dgrams = data.dgrams |> Datagrams.withdraw() |> Datagrams.close()

    Telemetry.stop(
      :connection,
      data.started_at || System.monotonic_time(),
      Map.put(Reports.telemetry_meta(data), :reason, data.close_reason || reason),
      Reports.stop_measurements(data)
    )

    :ok
  end

  ## The driver pass and the state changes it implies

  @doc """
  One driver pass for an event (`packets` read, quiche's `timer?` fired,
  or neither) and the state change it implies: returns the `:gen_statem`
  result, with quiche's timer, the pacer's timer and `actions`.
  """
  def drive(state, data, packets, timer?, actions \\ [], to \\ nil) do
    {state, data, status} =
      if packets != [] or timer? or Driver.poll_needed?(data) do
        {poll, data} = Driver.poll(data, packets, timer?, to)
        {state, data, status} = maybe_established(state, data, poll)
        # A client refused at the end of the handshake reaches no one.
        data = if data.closing == :refused, do: data, else: Driver.dispatch(data, poll)
        {state, data, status}
      else
        {state, data, %{draining: false, closed: false, actions: []}}
      end

    actions = status.actions ++ actions

    {data, out} = Driver.flush(data)
    timer = {{:timeout, :quic}, quic_timeout(out.timeout), :fire}
    pace = {{:timeout, :pace}, out.pace || :infinity, :fire}

    # What the peer takes is known from the first flush after the handshake:
    # dgram_send/3 can check it in the caller from then on.
    data =
      if state == :established, do: %{data | dgrams: Datagrams.publish(data.dgrams)}, else: data

    cond do
      status.closed or out.closed ->
        finish(state, data, actions)

      state != :draining and (status.draining or data.closing != nil) ->
        data = closing(state, data)
        cap = {{:timeout, :drain_cap}, @drain_cap_ms, :expired}
        {:next_state, :draining, data, [timer, pace, cap | actions]}

      true ->
        {:next_state, state, data, [timer, pace | actions]}
    end
  end

  # quiche's next timer, within what an Erlang timer takes (a huge
  # max_idle_timeout could exceed it): a timer that fires early only makes
  # quiche find nothing due.
  defp quic_timeout(nil), do: :infinity
  defp quic_timeout(ms), do: min(ms, @max_timer_ms)

  defp maybe_established(:handshaking, data, %{established: true} = poll) do
    case refusal(data) do
      nil -> complete_handshake(data, poll)
      {code, phrase} -> refuse(data, poll, code, phrase)
    end
  end

  defp maybe_established(state, data, poll),
    do: {state, data, %{draining: poll.draining, closed: poll.closed, actions: []}}

  defp refuse(data, poll, code, phrase) do
    _ = Native.connection_close(data.native, false, code, phrase)
    status = %{draining: poll.draining, closed: poll.closed, actions: []}
    {:handshaking, %{data | closing: :refused}, status}
  end

  defp complete_handshake(data, poll) do
    status = %{
      draining: poll.draining,
      closed: poll.closed,
      actions: [{{:timeout, :handshake}, :cancel}]
    }

    {:established, established(data), status}
  end

  defp finish(state, data, actions) do
    data = if state == :draining, do: data, else: closing(state, data)
    {:next_state, :closed, data, actions ++ [{:next_event, :internal, :stop}]}
  end
end
